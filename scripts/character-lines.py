#!/usr/bin/env python3
"""One character's speeches of a play in tiny-Shakespeare's format, as `rwkv tune` data.

    python3 scripts/character-lines.py data/tinyshakespeare.txt ROMEO > romeo.jsonl

Each speech (its "NAME:" line, its lines and the blank line after) becomes one
`{"text": ...}` line, in the order of the play: `rwkv tune` holds out the last tenth.
With --text the speeches are written as one text instead.
"""
import json
import sys


def main():
    args = [a for a in sys.argv[1:] if a != "--text"]
    if len(args) != 2:
        sys.exit(__doc__.strip())
    path, name = args
    text = open(path, encoding="utf-8").read()
    speeches = [b for b in text.split("\n\n") if b.split("\n", 1)[0] == name + ":"]
    if not speeches:
        sys.exit(f"{path}: no speech of {name}")
    if "--text" in sys.argv:
        sys.stdout.write("\n\n".join(speeches) + "\n")
    else:
        for s in speeches:
            sys.stdout.write(json.dumps({"text": s + "\n\n"}) + "\n")


if __name__ == "__main__":
    main()
