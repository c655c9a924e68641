"""Validate a dataset and report every problem at once.

    python -m jax_inpaint_rl.data.check PATH [--kind auto|inpaint|edit|prompts]
        [--embedding-shape t5=512x4096 ...] [--split train] [--mask-kind mixed] [--prompt-key label]

PATH is a self_bench folder, a .json / .jsonl / .txt listing, a prepared TFDS
directory or `tfds:NAME`. Each problem names the file (or record) and what was
expected; the exit status is 1 if there is any. The last line sums up: the kind
(inpaint / edit / prompts), the example count, the fields every example provides
(see formats.py) and the problem count. The training loader runs the same
`validate.find_problems` at start-up.
"""
import argparse
import sys

from jax_inpaint_rl.data.formats import DataError
from jax_inpaint_rl.data.sources import open_source
from jax_inpaint_rl.data.validate import find_problems


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition("=")
    try:
        return name, tuple(int(d) for d in dims.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=D1xD2..., e.g. t5=512x4096") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_inpaint_rl.data.check", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="self_bench folder, .json/.jsonl/.txt, prepared TFDS folder or tfds:NAME")
    parser.add_argument("--kind", default="auto", help="auto | inpaint | edit | prompts (JSON listings)")
    parser.add_argument("--embedding-shape", type=_shape_arg, action="append", default=[],
                        help="expected embedding shape, NAME=D1xD2 (repeatable)")
    parser.add_argument("--split", default="train", help="TFDS split")
    parser.add_argument("--mask-kind", default="mixed", help="TFDS without masks: box | brush | text | mixed")
    parser.add_argument("--prompt-key", default=None, help="TFDS without prompts: feature used as the prompt")
    args = parser.parse_args(argv)
    try:
        source = open_source(args.path, args.kind, split=args.split, mask_kind=args.mask_kind,
                             prompt_key=args.prompt_key)
        problems = find_problems(source, dict(args.embedding_shape))
    except DataError as error:  # the listing itself could not be read
        source, problems = None, error.problems
    for problem in problems:
        print(problem)
    print(summary(args.path, source, len(problems)))
    return 1 if problems else 0


def summary(path: str, source, problem_count: int) -> str:
    """'PATH: edit set, 12 examples, fields: image, prompt (no mask: ...), 0 problem(s)'."""
    if source is None:
        return f"{path}: 0 examples, {problem_count} problem(s)"
    fields = ", ".join(sorted(source.fields))
    if "image" in source.fields and "mask" not in source.fields:
        fields += " (no mask: inpainting families cannot train on it)"
    return f"{path}: {source.kind} set, {len(source)} examples, fields: {fields}, {problem_count} problem(s)"


if __name__ == "__main__":
    sys.exit(main())
