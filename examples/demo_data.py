"""Make the demo's data: a ~1 MB sample of UniversalNER's CrossNER sets (MIT) that `chatmask demo` trains on.

    python examples/demo_data.py [--uniner ../shared/data/uniner] [--check]

Writes src/chatmask/data/crossner_demo.jsonl (OpenAI messages rows with their domain), its README.md and
LICENSE-UniversalNER; `--check` writes nothing and exits 1 when the shipped files differ from fresh ones.
"""

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chatmask.paths import atomic_write_text

DATA = ROOT / "src" / "chatmask" / "data"
DOMAINS = ("AI", "literature", "music", "politics")
BUDGET = 1_000_000  # bytes of JSONL; the issue allows about 1 MB inside the package
ROLES = ("human", "gpt")


def alternates(turns) -> bool:
    """human, gpt, human, gpt, ... with text in every turn, ending on the answer: what the demo trains."""
    return (isinstance(turns, list) and len(turns) >= 2 and len(turns) % 2 == 0
            and all(isinstance(t, dict) and t.get("from") == ROLES[i % 2] and isinstance(t.get("value"), str)
                    and t["value"].strip() for i, t in enumerate(turns)))


def pools(uniner: Path) -> tuple[list[list[dict]], dict[str, int]]:
    """Each domain's rows in a seeded shuffle (the same order on every machine), and the rows dropped
    because their turns do not alternate, per domain."""
    out, dropped = [], {}
    for dom in DOMAINS:
        rows = json.loads((uniner / f"CrossNER_{dom}.json").read_text(encoding="utf-8"))
        random.Random(0).shuffle(rows)
        good = [r for r in rows if alternates(r.get("conversations"))]
        dropped[dom.lower()] = len(rows) - len(good)
        out.append(good)
    return out, dropped


def line(row: dict, domain: str) -> str:
    msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in row["conversations"]]
    return json.dumps({"messages": msgs, "domain": domain}, ensure_ascii=False)


def sample(uniner: Path) -> tuple[str, dict[str, int], dict[str, int]]:
    """The JSONL text: rows taken in turn from the four domains, whole, until the next would pass BUDGET;
    with the rows kept and dropped per domain."""
    domain_rows, dropped = pools(uniner)
    lines, size, kept = [], 0, dict.fromkeys(dropped, 0)
    for i in range(max(map(len, domain_rows))):
        for dom, rows in zip(kept, domain_rows):
            if i >= len(rows):
                continue  # a domain ran out: the others go on
            text = line(rows[i], dom)
            if size + len(text.encode("utf-8")) + 1 > BUDGET:
                return "".join(s + "\n" for s in lines), kept, dropped
            lines.append(text)
            size += len(text.encode("utf-8")) + 1
            kept[dom] += 1
    return "".join(s + "\n" for s in lines), kept, dropped


def readme(text: str, kept: dict[str, int], dropped: dict[str, int]) -> str:
    rows = [json.loads(s)["messages"] for s in text.splitlines()]
    user, answer = (sum(len(m["content"]) for r in rows for m in r if m["role"] == role) / len(rows)
                    for role in ("user", "assistant"))
    per_domain = ", ".join(f"{dom} {n:,}" for dom, n in kept.items())
    return f"""# chatmask's demo data

`crossner_demo.jsonl`: {len(rows):,} conversations ({len(text.encode("utf-8")):,} bytes) sampled from
UniversalNER's CrossNER sets, the NER case where the user says far more than the assistant: per row
{user:.0f} characters from the user, {answer:.0f} from the assistant. One OpenAI `messages` row a line
with its `domain`; rows per domain: {per_domain}.

Made by `python examples/demo_data.py` (`--check` verifies it) from UniversalNER's
`CrossNER_{{AI,literature,music,politics}}.json`: each file's rows shuffled with `random.Random(0)`, taken
in turn from the four domains, whole, until the next row would pass {BUDGET:,} bytes. Rows whose turns do
not alternate human/gpt are dropped: {sum(dropped.values()):,} here.

Licence: MIT, the UniversalNER project's, in `LICENSE-UniversalNER`.
"""


def licence(uniner: Path, rows: int) -> str:
    head = (f"This licence covers crossner_demo.jsonl in this folder: {rows:,} conversations sampled from the\n"
            "CrossNER sets (AI, literature, music, politics) as released by the UniversalNER project, turned\n"
            "into chat messages by examples/demo_data.py. The UniversalNER licence, verbatim:\n\n")
    return head + (uniner / "LICENSE").read_text(encoding="utf-8")


def files(uniner: Path) -> dict[Path, str]:
    """Every file the sample is made of, by path, as text."""
    text, kept, dropped = sample(uniner)
    return {DATA / "crossner_demo.jsonl": text, DATA / "README.md": readme(text, kept, dropped),
            DATA / "LICENSE-UniversalNER": licence(uniner, sum(kept.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uniner", default=str(ROOT.parent / "shared" / "data" / "uniner"),
                    help="the folder of UniversalNER's CrossNER_*.json and LICENSE (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the shipped files differ from fresh ones")
    args = ap.parse_args()
    missing = [f"CrossNER_{d}.json" for d in DOMAINS if not (Path(args.uniner) / f"CrossNER_{d}.json").is_file()]
    if missing:
        sys.exit(f"{args.uniner} lacks {', '.join(missing)}: pass --uniner DIR, the folder of UniversalNER's sets")
    fresh = files(Path(args.uniner))
    if args.check:
        stale = [p.name for p, text in fresh.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        print(f"differ from a fresh sample: {', '.join(stale)}" if stale else "the shipped demo data is up to date")
        sys.exit(1 if stale else 0)
    DATA.mkdir(parents=True, exist_ok=True)
    for path, text in fresh.items():
        atomic_write_text(path, text)
    rows = fresh[DATA / "crossner_demo.jsonl"]
    print(f"wrote {DATA}: {rows.count(chr(10)):,} rows, {len(rows.encode('utf-8')):,} bytes")


if __name__ == "__main__":
    main()
