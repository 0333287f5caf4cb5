"""Transport: the HTTP protocol uvicorn runs, below the API (api/ imports this package,
never the reverse).

- answer.py: the answer type and the direct route's signature
- one_write.py: a response's head and body in one write
- protocol.py: the direct route and the bounds on a connection
- uvicorn_check.py: whether the installed uvicorn has what protocol.py relies on
"""
