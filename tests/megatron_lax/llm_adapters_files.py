"""Test files shaped exactly like LLM-Adapters' dataset/NAME/test.json: every key (instruction,
input, output, answer), outputs left empty, answers as the real files write them (numbers as
strings or as JSON numbers, option labels, letters), and the option lists in the instructions
("Answer format: ..."). The texts are made up; the shapes are the point."""
from __future__ import annotations

import json
from pathlib import Path

MATH = {  # dataset -> [(question, answer as the file writes it, a response that is right)]
    "gsm8k": [("A baker makes 16 rolls and sells 9. How many are left?", "7", "16 - 9 = 7. The answer is 7."),
              ("Each of 3 crates holds 1,200 nails. How many nails?", "3600", "3 x 1,200 = 3,600 nails.")],
    "mawps": [("Tom had 8.0 pears and ate 3.0. How many remain?", 5.0, "8.0 - 3.0 = 5.0")],
    "mathqa": [("a train covers 60 km in 1.5 hours. speed? Answer Choices: (A) 30 (B) 40 (C) 45 (D) 50 (E) 60",
                "b", "60 / 1.5 = 40, so the answer is B")],
    "AddSub": [("Sara has 31 red and 24 green balloons. How many in all?", "55.0", "31 + 24 = 55")],
    "MultiArith": [("A class had 14 students and 6 more joined, then 4 left. How many now?", 16, "The answer is 16")],
    "SingleEq": [("Joan spent 9.5 dollars and 4.25 dollars. How much in all?", "13.75", "13.75 dollars")],
    "SVAMP": [("There are 7 boxes with 5 pens each. How many pens?", "35.0", "7 x 5 = 35")],
    "AQuA": [("What is 15% of 80? Answer Choices: (A) 8 (B) 10 (C) 12 (D) 14 (E) 16", "C",
              "15% of 80 is 12. The answer is C")],
}
COMMONSENSE = {  # dataset -> (options, [(question, answer, a response that is right)])
    "boolq": ("true/false", [("is the sky blue on a clear day", "true", "the correct answer is true")]),
    "piqa": ("solution1/solution2", [("To open a jar: Solution1: twist the lid Solution2: shake it", "solution1",
                                      "the correct answer is solution1")]),
    "social_i_qa": ("answer1/answer2/answer3", [("Why did Ana smile? Answer1: ... Answer2: ... Answer3: ...",
                                                 "answer3", "the correct answer is answer3")]),
    "hellaswag": ("ending1/ending2/ending3/ending4", [("A man lifts a bar. Ending1: ... Ending4: ...", "ending2",
                                                       "the correct answer is ending2")]),
    "winogrande": ("option1/option2", [("The cup did not fit in the bag because _ was small. Option1: cup "
                                        "Option2: bag", "option2", "the correct answer is option2")]),
    "ARC-Challenge": ("answer1/answer2/answer3/answer4", [("Which is a mammal? Answer1: ... Answer4: ...", "answer4",
                                                           "the correct answer is answer4")]),
    "ARC-Easy": ("answer1/answer2/answer3/answer4/answer5", [("Which is liquid? Answer1: ... Answer5: ...",
                                                              "answer5", "the correct answer is answer5")]),
    "openbookqa": ("answer1/answer2/answer3/answer4", [("Sunlight helps plants to Answer1: ... Answer4: ...",
                                                        "answer1", "the correct answer is answer1")]),
}
COMMONSENSE_PROMPT = {"boolq": "Please answer the following question with true or false, question: {q}?",
                      "piqa": "Please choose the correct solution to the question: {q}",
                      "social_i_qa": "Please choose the correct answer to the question: {q}",
                      "hellaswag": "Please choose the correct ending to complete the given sentence: {q}",
                      "winogrande": "Please choose the correct answer to fill in the blank to complete the given "
                                    "sentence: {q}",
                      "ARC-Challenge": "Please choose the correct answer to the question: {q}",
                      "ARC-Easy": "Please choose the correct answer to the question: {q}",
                      "openbookqa": "Please choose the correct answer to the question: {q}"}
BROKEN_GSM8K = [{"instruction": "no answer at all", "input": "", "output": ""}, "not a record",
                {"instruction": "empty answer", "input": "", "output": "", "answer": ""}]


def write(root: Path) -> dict[str, list]:
    """Writes root/NAME/test.json for every dataset; returns NAME -> [(record, right response)] of the
    usable records (gsm8k also gets the three broken records of BROKEN_GSM8K)."""
    usable = {}
    for name, items in MATH.items():
        usable[name] = [({"instruction": q, "input": "", "output": "", "answer": a}, right) for q, a, right in items]
    for name, (options, items) in COMMONSENSE.items():
        usable[name] = [({"instruction": f"{COMMONSENSE_PROMPT[name].format(q=q)}\n\nAnswer format: {options}",
                          "input": "", "output": "", "answer": a}, right) for q, a, right in items]
    for name, pairs in usable.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        records = [r for r, _ in pairs] + (BROKEN_GSM8K if name == "gsm8k" else [])
        (root / name / "test.json").write_text(json.dumps(records, indent=4))
    return usable
