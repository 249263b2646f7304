"""A deterministic arithmetic word-problem task in the math_10k layout (LLM-Adapters), and narrative
arithmetic text in the allenai/c4 layout for pre-training a base model that can read such problems:

    python -m data_prep.make_arithmetic --output data/arithmetic [--train 2000] [--test 300] [--seed 0]

writes
    DIR/train.json, DIR/test.json      [{"instruction", "input": "", "output", "answer"}, ...]
    DIR/test_seen_operands.json        a diagnostic: new problems over the training operands
    (--split templates: DIR/train.json, DIR/test_{templates,pairs,both}.json and the selection set
     DIR/select_templates.json, see `template_split`)
    DIR/pretrain/arith-{train,validation}.00000-of-00001.json.gz     narrative text, C4 layout

Problems take one step (add, take away, compare, multiply) or two (add then take away, multiply then
add, add three numbers); `output` is a worked solution ending in "The answer is N." Operands are
split by number: a test problem uses only numbers that never appear as an operand of a training
problem (multiplications use the numbers up to 9 of each side). Solutions are the equations, one
per step, so that greedy decoding without a KV cache stays affordable on a CPU. The narrative text states facts
over every number, as a base model's general knowledge would; it never uses the problem templates.
The same arguments always write the same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Victor"]
THINGS = ["apples", "marbles", "stickers", "pencils", "books", "shells", "cookies", "stamps", "coins", "cards",
          "buttons", "flowers", "eggs", "candles", "ribbons"]
CONTAINERS = [("boxes", "box"), ("bags", "bag"), ("rows", "row"), ("jars", "jar"), ("baskets", "basket")]
MAX_NUMBER = 25  # operands are 2..MAX_NUMBER
MAX_FACTOR = 9  # multiplication operands are 2..MAX_FACTOR
TEST_SHARE = 0.3


def operand_pools(seed: int, max_number: int = MAX_NUMBER, max_factor: int = MAX_FACTOR,
                  test_share: float = TEST_SHARE) -> dict[str, list[int]]:
    """Disjoint train/test operand numbers, within the small factors and within the rest separately
    so that both sides have multiplication operands."""
    rng = random.Random(f"pools-{seed}")
    pools = {"train": [], "test": []}
    for block in (list(range(2, max_factor + 1)), list(range(max_factor + 1, max_number + 1))):
        rng.shuffle(block)
        cut = round(len(block) * test_share)
        pools["test"] += sorted(block[:cut])
        pools["train"] += sorted(block[cut:])
    return {side: sorted(numbers) for side, numbers in pools.items()}


def _people(rng):
    first, second = rng.sample(NAMES, 2)
    return first, second


# One-step problems in five wordings each. Wording 0 is the original task's; the template split trains on
# wordings 0-2, tests on HELD_OUT_WORDING and chooses hyperparameters on SELECTION_WORDING, so that the
# choice measures transfer to a new wording without looking at the test's. Every wording tells the
# operation with a word the narrative pre-training text uses for it ("more", "added", "took", "lost",
# "each"), as a base model's general knowledge would; the two held-out ones are close to that text, so
# that a model can read them without having been fine-tuned on them, and the question is whether the
# fine-tune carries over.
WORDINGS = {
    "add": ["{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?",
            "{n} found {a} {t} in the morning, and {b} more turned up later. How many {t} did {n} end up with?",
            "In the shed there were {a} {t}, and then {n} added another {b}. What is the number of {t} in the shed?",
            "{n} put {a} {t} on the table and {m} added {b}. How many {t} are on the table?",
            "The market sold {a} {t} before noon and {b} after it. How many {t} did the market sell?"],
    "take_away": ["{n} has {a} {t}. {n} gives {b} {t} to {m}. How many {t} does {n} have left?",
                  "Of the {a} {t} in the drawer, {m} took {b}. How many {t} stayed behind?",
                  "There were {a} {t} in a jar until {m} took {b} away. How many {t} are still in the jar?",
                  "{n} had {a} {t} but lost {b} of them on the way home. How many {t} were left?",
                  "{n} had {a} {t} and {m} took {b} of them. How many {t} stayed with {n}?"],
    "compare": ["{n} has {a} {t} and {m} has {b} {t}. How many more {t} does {n} have than {m}?",
                "{m} collected {b} {t}, while {n} collected {a}. How many more {t} did {n} collect?",
                "Compare the {a} {t} of {n} with the {b} {t} of {m}: how many more does {n} have?",
                "{n} owns {a} {t} and {m} owns {b}. How many more {t} does {n} own than {m}?",
                "{n} counted {a} {t} and {m} counted {b}. How many more {t} did {n} count?"],
    "multiply": ["There are {a} {plural} with {b} {t} in each {single}. How many {t} are there in total?",
                 "{n} fills {a} {plural} with {b} {t} each. How many {t} does {n} use?",
                 "Each of the {a} {plural} holds {b} {t}. How many {t} are there altogether?",
                 "{n} kept {a} {plural} of {b} {t} each in the shed. How many {t} are in the shed?",
                 "The {a} {plural} held {b} {t} each. How many {t} did the {plural} hold altogether?"],
}
HELD_OUT_WORDING = 3  # the test files'
SELECTION_WORDING = 4  # the selection file's (select_templates.json)


def add(rng, pick, wording=0):
    a, b = pick(), pick()
    n, m = _people(rng)
    t = rng.choice(THINGS)
    question = WORDINGS["add"][wording].format(n=n, m=m, a=a, b=b, t=t)
    return question, f"{a} + {b} = {a + b}.", a + b


def take_away(rng, pick, wording=0):
    a, b = sorted((pick(), pick()), reverse=True)
    n, m = _people(rng)
    t = rng.choice(THINGS)
    question = WORDINGS["take_away"][wording].format(n=n, m=m, a=a, b=b, t=t)
    return question, f"{a} - {b} = {a - b}.", a - b


def compare(rng, pick, wording=0):
    a, b = sorted((pick(), pick()), reverse=True)
    n, m = _people(rng)
    t = rng.choice(THINGS)
    question = WORDINGS["compare"][wording].format(n=n, m=m, a=a, b=b, t=t)
    return question, f"{a} - {b} = {a - b}.", a - b


def multiply(rng, pick_factor, wording=0):
    a, b = pick_factor(), pick_factor()
    plural, single = rng.choice(CONTAINERS)
    t = rng.choice(THINGS)
    n = NAMES[(a * 7 + b) % len(NAMES)]  # no draw from rng: wording 0 keeps the original task's bytes
    question = WORDINGS["multiply"][wording].format(n=n, a=a, b=b, t=t, plural=plural, single=single)
    return question, f"{a} x {b} = {a * b}.", a * b


def add_then_take_away(rng, pick):
    a, b = pick(), pick()
    c = pick()
    while c > a + b:
        c = pick()
    n, m = _people(rng)
    t = rng.choice(THINGS)
    question = (f"{n} has {a} {t}. {n} buys {b} more {t} and then gives {c} {t} to {m}. "
                f"How many {t} does {n} have now?")
    steps = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."
    return question, steps, a + b - c


def multiply_then_add(rng, pick, pick_factor):
    a, b, c = pick_factor(), pick_factor(), pick()
    plural, single = rng.choice(CONTAINERS)
    n, _ = _people(rng)
    t = rng.choice(THINGS)
    question = (f"{n} has {c} {t} and buys {a} {plural} with {b} {t} in each {single}. "
                f"How many {t} does {n} have now?")
    steps = f"{a} x {b} = {a * b}. {a * b} + {c} = {a * b + c}."
    return question, steps, a * b + c


def add_three(rng, pick):
    a, b, c = pick(), pick(), pick()
    n, _ = _people(rng)
    t = rng.choice(THINGS)
    question = (f"{n} counts {a} red {t}, {b} blue {t} and {c} green {t}. How many {t} does {n} count in all?")
    steps = f"{a} + {b} = {a + b}. {a + b} + {c} = {a + b + c}."
    return question, steps, a + b + c


KINDS = ("add", "take_away", "compare", "multiply", "add_then_take_away", "multiply_then_add", "add_three")
ONE_STEP = KINDS[:4]


def problem(rng: random.Random, numbers: list[int], kinds=KINDS, max_factor: int = MAX_FACTOR,
            wordings: dict[str, list[int]] | None = None) -> dict:
    """One problem of a random kind; `wordings` (kind -> allowed wording indices) draws the wording too,
    without it every one-step problem has wording 0."""
    factors = [n for n in numbers if n <= max_factor]
    pick, pick_factor = (lambda: rng.choice(numbers)), (lambda: rng.choice(factors))
    kind = rng.choice(list(kinds))
    w = rng.choice(wordings[kind]) if wordings else 0
    make_one = {"add": lambda: add(rng, pick, w), "take_away": lambda: take_away(rng, pick, w),
                "compare": lambda: compare(rng, pick, w), "multiply": lambda: multiply(rng, pick_factor, w),
                "add_then_take_away": lambda: add_then_take_away(rng, pick),
                "multiply_then_add": lambda: multiply_then_add(rng, pick, pick_factor),
                "add_three": lambda: add_three(rng, pick)}
    question, steps, answer = make_one[kind]()
    return {"instruction": question, "input": "", "output": f"{steps} The answer is {answer}.", "answer": str(answer)}


def problems(n: int, numbers: list[int], seed: str, kinds=KINDS, max_factor: int = MAX_FACTOR) -> list[dict]:
    rng = random.Random(seed)
    return [problem(rng, numbers, kinds, max_factor) for _ in range(n)]


def pair_side(record: dict, seed: int, test_share: float) -> str:
    """`test` or `train` for a one-step problem, by its unordered operand pair (seeded): the pairs
    split, where every number is an operand on both sides but no test pair is a training pair."""
    pair = operand_pair(record)
    return "test" if random.Random(f"pair-{seed}-{pair}").random() < test_share else "train"


def operand_pair(record: dict) -> tuple:
    """(operation, smaller operand, larger operand) of a one-step problem."""
    a, op, b = EQUATION.match(record["output"]).groups()
    return (op, *sorted((int(a), int(b))))


EQUATION = re.compile(r"(\d+) ([+x-]) (\d+) = ")


def pair_problems(n: int, numbers: list[int], seed: int, side: str, kinds, max_factor: int,
                  test_share: float, wordings: dict[str, list[int]] | None = None, name: str = "",
                  among: set | None = None) -> list[dict]:
    """n one-step problems over `numbers` whose operand pair lies on `side` (and is one of `among`,
    when given), by rejection sampling."""
    rng, out = random.Random(f"{name}{side}-pairs-{seed}"), []
    while len(out) < n:
        record = problem(rng, numbers, kinds, max_factor, wordings)
        if pair_side(record, seed, test_share) == side and (among is None or operand_pair(record) in among):
            out.append(record)
    return out


def template_split(n_train: int, n_test: int, numbers: list[int], seed: int, kinds, max_factor: int,
                   test_share: float) -> dict[str, list[dict]]:
    """Training problems in three wordings of each kind over the training operand pairs, three test sets
    that change one thing or both: the held-out wording over pairs that training shows (`test_templates`),
    held-out pairs in the training wordings (`test_pairs`), or both (`test_both`); and a selection set,
    `select_templates`, that is `test_templates` in a wording of its own (SELECTION_WORDING), for choosing
    hyperparameters on transfer to new text without looking at any test wording."""
    held_out = (HELD_OUT_WORDING, SELECTION_WORDING)
    seen = {k: [w for w in range(len(WORDINGS[k])) if w not in held_out] for k in kinds}
    unseen = {k: [HELD_OUT_WORDING] for k in kinds}
    selection = {k: [SELECTION_WORDING] for k in kinds}
    split = lambda n, side, wordings, name, among=None: pair_problems(n, numbers, seed, side, kinds, max_factor,
                                                                      test_share, wordings, name, among)
    train = split(n_train, "train", seen, "seen-wording-")
    train_pairs = {operand_pair(r) for r in train}
    return {"train": train,
            "select_templates": split(n_test, "train", selection, "selection-wording-", train_pairs),
            "test_templates": split(n_test, "train", unseen, "unseen-wording-", train_pairs),
            "test_pairs": split(n_test, "test", seen, "seen-wording-"),
            "test_both": split(n_test, "test", unseen, "unseen-wording-")}


# --- narrative text for pre-training ----------------------------------------------------------------

def narrative_sentence(rng: random.Random, max_number: int = MAX_NUMBER, max_factor: int = MAX_FACTOR) -> str:
    """One sentence stating a fact of the kind a problem's step needs: a first operand up to the
    largest intermediate result (a sum of two operands, or a product), a second up to MAX_NUMBER."""
    n, m = _people(rng)
    t = rng.choice(THINGS)
    a = rng.randint(2, rng.choice([max_number, 2 * max_number, max_factor ** 2]))
    b = rng.randint(2, max_number)
    x, y = rng.randint(2, max_factor), rng.randint(2, max_factor)
    hi, lo = a + b, b
    plural, _ = rng.choice(CONTAINERS)
    return rng.choice([
        f"In the morning {n} found {a} {t}, and by the evening {b} more had turned up, which made {a + b} {t}.",
        f"{n} put {a} {t} on the table and {m} added {b}; {a} + {b} = {a + b}, so there were {a + b} {t}.",
        f"Of the {hi} {t} in the drawer, {m} took {lo}, and {hi} - {lo} = {hi - lo} {t} stayed behind.",
        f"{n} had {hi} {t} but lost {lo} of them on the way home, leaving {hi} - {lo} = {hi - lo}.",
        f"{m} kept {x} {plural} of {y} {t} each in the shed, {x} x {y} = {x * y} {t} altogether.",
        f"Since {x} x {y} = {x * y}, the {x} {plural} held {x * y} {t}.",
        f"{n} counted again: {a} plus {b} is {a + b}, and {hi} minus {lo} is {hi - lo}.",
        f"The market sold {a} {t} before noon and {b} after it, {a + b} {t} in one day.",
    ])


def narrative_documents(n: int, seed: str, max_number: int = MAX_NUMBER, max_factor: int = MAX_FACTOR) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(narrative_sentence(rng, max_number, max_factor) for _ in range(rng.randint(4, 12)))
            for _ in range(n)]


def write_json(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records, indent=1) + "\n")


def write_c4_shard(path: Path, documents: list[str]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as raw:  # mtime 0: the same bytes on every run
        for i, text in enumerate(documents):
            record = {"text": text, "timestamp": "2024-01-01T00:00:00Z", "url": f"arithmetic://{path.name}/{i}"}
            raw.write((json.dumps(record) + "\n").encode("utf-8"))


def make(output: Path, n_train: int, n_test: int, n_documents: int, seed: int, max_number: int = MAX_NUMBER,
         max_factor: int = MAX_FACTOR, kinds=KINDS, split: str = "operands", test_share: float = TEST_SHARE) -> dict:
    """split `operands`: test problems use only numbers that no training problem uses (plus the
    test_seen_operands.json diagnostic); `pairs` (one-step kinds only): every number appears on both
    sides but no test operand pair is a training pair, so a test answer is a fact the base saw in
    pre-training and the fine-tune never showed; `templates` (one-step kinds): the pairs split, and
    two of the five wordings of each kind held out of training as well, one for the tests and one for
    choosing hyperparameters (`template_split`)."""
    output.mkdir(parents=True, exist_ok=True)
    if split in ("pairs", "templates") and set(kinds) - set(ONE_STEP):
        raise ValueError(f"the {split} split needs one-step kinds ({', '.join(ONE_STEP)})")
    if split == "templates":
        numbers = list(range(2, max_number + 1))
        for name, records in template_split(n_train, n_test, numbers, seed, kinds, max_factor, test_share).items():
            write_json(output / f"{name}.json", records)
        pools = {"train": numbers, "test": numbers}
    elif split == "pairs":
        numbers = list(range(2, max_number + 1))
        train = pair_problems(n_train, numbers, seed, "train", kinds, max_factor, test_share)
        write_json(output / "train.json", train)
        write_json(output / "test.json", pair_problems(n_test, numbers, seed, "test", kinds, max_factor, test_share))
        pools = {"train": numbers, "test": numbers}
    else:
        pools = operand_pools(seed, max_number, max_factor, test_share)
        train = problems(n_train, pools["train"], f"train-{seed}", kinds, max_factor)
        write_json(output / "train.json", train)
        write_json(output / "test.json", problems(n_test, pools["test"], f"test-{seed}", kinds, max_factor))
        seen = {r["instruction"] for r in train}
        write_json(output / "test_seen_operands.json",
                   [r for r in problems(2 * n_test, pools["train"], f"seen-{seed}", kinds, max_factor)
                    if r["instruction"] not in seen][:n_test])
    (output / "pretrain").mkdir(exist_ok=True)
    write_c4_shard(output / "pretrain" / "arith-train.00000-of-00001.json.gz",
                   narrative_documents(n_documents, f"narrative-train-{seed}", max_number, max_factor))
    write_c4_shard(output / "pretrain" / "arith-validation.00000-of-00001.json.gz",
                   narrative_documents(max(1, n_documents // 20), f"narrative-validation-{seed}", max_number,
                                       max_factor))
    return pools


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.make_arithmetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("data/arithmetic"))
    parser.add_argument("--train", type=int, default=1500, help="training problems")
    parser.add_argument("--test", type=int, default=240, help="test problems")
    parser.add_argument("--documents", type=int, default=6000, help="narrative pre-training documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-number", type=int, default=MAX_NUMBER, help="operands are 2..this")
    parser.add_argument("--max-factor", type=int, default=MAX_FACTOR, help="multiplication operands are 2..this")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    parser.add_argument("--split", choices=("operands", "pairs", "templates"), default="operands")
    parser.add_argument("--test-share", type=float, default=TEST_SHARE)
    args = parser.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}")
    pools = make(args.output, args.train, args.test, args.documents, args.seed, args.max_number, args.max_factor,
                 kinds, args.split, args.test_share)
    print(f"wrote {args.train} training and {args.test} test problems and {args.documents} narrative documents to "
          f"{args.output}; test operands {pools['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
