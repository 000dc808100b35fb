"""The demos' result tables: written to JSON beside the run, and printed with a legend."""
import json
import textwrap
import time
from pathlib import Path

# what each column means, printed under every table that shows it (metric key -> line)
LEGEND = {
    "oracle": "the hidden task reward the demo's human labels come from (distinct on-topic words count, "
              "off-topic words, repeats and lists over six words cost); the labellers rank samples by it, "
              "PPO never sees it; higher is better",
    "reward_model": "the reward model's mean score of the samples: what PPO maximises, learnt from the "
                    "oracle's rankings; a higher RM score with a flat oracle is over-optimisation",
    "kl_to_ref": "KL to the SFT model (the reference), summed over a response's tokens, in nats: how far "
                 "training moved the policy; lower is closer",
    "words": "mean response length in words",
    "helpfulness": "the hidden helpfulness labeller's score (the main demo's oracle; a refusal helps no one); "
                   "higher is better",
    "safety": "the hidden safety labeller's score (-1 per tool word, +2 for declining a tagged request); "
              "higher is safer",
    "helpfulness_tagged": "helpfulness on the safety-tagged prompts (tool requests) alone",
    "safety_tagged": "safety on the safety-tagged prompts alone",
}


def finish(table: dict, start: float, path: Path, title: str, columns: list[tuple[str, str, int, int]],
           note_key: str | None = None) -> dict:
    """Add the wall time to `table` ({policy: {metric: value}}), write it to `path` as JSON and print
    it: one row per policy, columns (metric key, header, width, decimals), then `note_key`'s
    value (an example response) if given, then a legend line per column LEGEND explains."""
    table["wall_s"] = time.perf_counter() - start
    path.write_text(json.dumps(table, indent=2) + "\n")
    name_width = max(len(name) for name in table) + 2
    print(f"\n{title}")
    print(f"{'policy':<{name_width}}" + "".join(f"{header:>{width}}" for _, header, width, _ in columns))
    for name, row in table.items():
        if name == "wall_s":
            continue
        line = f"{name:<{name_width}}" + "".join(f"{row[key]:>{width}.{decimals}f}" for key, _, width, decimals in columns)
        print(line + (f"   e.g. {row[note_key]!r}" if note_key else ""))
    explained = [(header, LEGEND[key]) for key, header, _, _ in columns if key in LEGEND]
    if explained:
        width = max(len(header) for header, _ in explained) + 4
        print("where")
        for header, text in explained:
            print(textwrap.fill(text, 100, initial_indent=f"  {header + ':':<{width - 2}}", subsequent_indent=" " * width))
    print(f"wall time {table['wall_s']:.0f} s; table written to {path}")
    return table
