"""Fixed texts every model is run on when it loads: the int8/uint8 calibration ranges
(engine/calibration.py) and the precision probe (backends/precision.py). Short queries,
passages, several languages, code and numbers; `long_texts` joins them into passages
near a model's length limit."""

from __future__ import annotations

TEXTS = (
    "how do vaccines train the immune system",
    "What is the capital of Australia?",
    "best hiking trails near Zurich in autumn",
    "symptoms of iron deficiency in adults",
    "how to reset a forgotten router password",
    "Which programming language should I learn first?",
    "cheap flights from Lisbon to Berlin in March",
    "why is the sky blue during the day and red at sunset",
    "difference between a loan and a line of credit",
    "recipe for a vegetarian lasagna without ricotta",
    "When did the Berlin Wall fall?",
    "how many calories does a 30 minute run burn",
    "python list comprehension with two conditions",
    "tenant rights when the landlord keeps the deposit",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing "
    "oxygen as a by-product.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War and shaped the modern idea "
    "of state sovereignty in Europe.",
    "To replace a bicycle inner tube, release the brake, remove the wheel, lever one side of "
    "the tyre off the rim and pull the tube out.",
    "Our quarterly revenue grew by 12 percent, driven by subscription renewals in the "
    "enterprise segment and lower churn.",
    "The patient presented with a persistent dry cough, mild fever and fatigue lasting more "
    "than two weeks.",
    "A binary search halves the interval on each step, so it finds an item in a sorted array "
    "in logarithmic time.",
    "The museum's new wing displays ceramics from the Song dynasty alongside contemporary "
    "glass sculpture.",
    "Interest rates were left unchanged at the central bank's meeting, as inflation eased "
    "for the third consecutive month.",
    "The defendant's appeal was dismissed because the trial court had applied the correct "
    "standard of review.",
    "Glaciers in the Alps have lost more than half of their volume since 1900, according to "
    "a long-term survey.",
    "Preheat the oven to 200 degrees, toss the vegetables in olive oil and roast them for "
    "thirty-five minutes.",
    "The striker scored twice in the second half to secure a comeback win for the visiting team.",
    "Error 404 means the server could not find the requested resource; check the URL for typos.",
    "Mitochondria produce most of the cell's supply of adenosine triphosphate through "
    "oxidative phosphorylation.",
    "The novel follows three generations of a fishing family on a remote island off the "
    "coast of Norway.",
    "Kubernetes restarts a container when its liveness probe fails and stops sending traffic "
    "when its readiness probe fails.",
    "Solar panels convert sunlight into direct current, which an inverter turns into "
    "alternating current for the home.",
    "The quick brown fox jumps over the lazy dog.",
    "Le musée est ouvert tous les jours sauf le lundi.",
    "Die Bahn fährt alle zwanzig Minuten vom Hauptbahnhof ab.",
    "El informe anual se publicará a finales de mayo.",
    "東京は日本の首都です。",
    "SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Invoice #48213 is due on 15 June; late payments incur a 2% monthly fee.",
    "Customer reported that the app crashes when uploading photos larger than 20 MB.",
    "Shipping to Canada takes five to seven business days; tracking numbers are sent by email.",
    "The committee approved the budget after a lengthy debate about school funding.",
    "Side effects may include dizziness, nausea and headache; stop taking the medicine if a "
    "rash appears.",
    "A black hole forms when a massive star collapses under its own gravity at the end of "
    "its life.",
    "thanks, that worked!",
    "ok",
    "Terms and conditions apply. Offer valid while stocks last.",
    "The wedding reception will be held in the garden if the weather allows.",
)


def long_texts(max_words: int) -> list[str]:
    """Two passages, of about half and all of `max_words` words, from the texts above in
    turn (a tokenizer makes more tokens than words: the caller truncates)."""
    words = " ".join(TEXTS).split()
    return [
        " ".join(words[i % len(words)] for i in range(max(1, n)))
        for n in (max_words // 2, max_words)
    ]
