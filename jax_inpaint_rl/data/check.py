"""Validate a dataset and report every problem at once.

    python -m jax_inpaint_rl.data.check PATH [--family flux_fill] [--targets] [--kind auto|inpaint|edit|prompts]
        [--embedding-shape t5=512x4096 ...] [--split train] [--mask-kind mixed] [--prompt-key label]

PATH is a self_bench folder, a Flow-GRPO dataset folder (`--split` picks
`{split}.txt` or `{split}_metadata.jsonl`), a .json / .jsonl / .txt listing, a
prepared TFDS directory or `tfds:NAME`. Each problem names the file (or record)
and what was expected; the exit status is 1 if there is any. The last line sums
up: what was read (the source's name: the listing file, or the TFDS split), the
kind (inpaint / edit / prompts), the example count, the fields every example
provides (see formats.py; 'metadata' for GenEval records) and the problem count.
With `--family` every field that family reads (its `inputs`) and every
precomputed embedding it does not take is a problem too; `--targets` also
requires `target` (SFT, the warm-up, one-step GRPO). The training loader runs
the same `validate.find_problems` at start-up, and the trainer the same field
check before it loads weights.
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
    parser.add_argument("path", help="self_bench or Flow-GRPO folder, .json/.jsonl/.txt, prepared TFDS folder or "
                                     "tfds:NAME")
    parser.add_argument("--kind", default="auto", help="auto | inpaint | edit | prompts (JSON listings)")
    parser.add_argument("--embedding-shape", type=_shape_arg, action="append", default=[],
                        help="expected embedding shape, NAME=D1xD2 (repeatable)")
    parser.add_argument("--split", default="train", help="TFDS or Flow-GRPO split (train, test)")
    parser.add_argument("--mask-kind", default="mixed", help="TFDS without masks: box | brush | text | mixed")
    parser.add_argument("--prompt-key", default=None, help="TFDS without prompts: feature used as the prompt")
    parser.add_argument("--family", default=None, help="a model family (e.g. flux_fill): its inputs are required")
    parser.add_argument("--targets", action="store_true", help="require targets (SFT, warm-up, one-step GRPO)")
    args = parser.parse_args(argv)
    try:
        source = open_source(args.path, args.kind, split=args.split, mask_kind=args.mask_kind,
                             prompt_key=args.prompt_key)
        problems = find_problems(source, dict(args.embedding_shape))
        problems += fit_problems(source, args.family, args.targets)
    except DataError as error:  # the listing itself could not be read
        source, problems = None, error.problems
    for problem in problems:
        print(problem)
    print(summary(args.path, source, len(problems)))
    return 1 if problems else 0


def fit_problems(source, family_name: str | None, targets: bool) -> list[str]:
    """What the family reads and the run needs but the data lacks, and embeddings the family does not take."""
    why, takes = {"target": "--targets asks for it"} if targets else {}, None
    if family_name:
        from jax_inpaint_rl.models.family import factory  # the model code only when a family is named

        family, _ = factory(family_name)(family_name, path=None, weights=False)
        why.update({field: f"{family_name} reads it" for field in family.inputs if field != "style_image"})
        if "style_image" in family.inputs:  # the loader crops it from the target inside the mask's box
            why.update({field: f"{family_name}'s style image is cropped from it" for field in ("mask", "target")})
        takes = set(family.text_embeddings)
    problems = [f"{source.name}: no '{field}' in every example; {why[field]}"
                for field in sorted(set(why) - set(source.fields))]
    given = {field.split(":", 1)[1] for field in source.fields if field.startswith("embedding:")}
    if takes is not None and given - takes:
        problems.append(f"{source.name}: precomputed embeddings {sorted(given - takes)} are not inputs of "
                        f"{family_name} (it takes {sorted(takes) or 'none'})")
    return problems


def summary(path: str, source, problem_count: int) -> str:
    """'NAME: edit set, 12 examples, fields: image, prompt (no mask: ...), 0 problem(s)', NAME saying what was
    read (PATH itself, or the split file / TFDS split under it)."""
    if source is None:
        return f"{path}: 0 examples, {problem_count} problem(s)"
    fields = ", ".join(sorted(source.fields))
    if "image" in source.fields and "mask" not in source.fields:
        fields += " (no mask: inpainting families cannot train on it)"
    return f"{source.name}: {source.kind} set, {len(source)} examples, fields: {fields}, {problem_count} problem(s)"


if __name__ == "__main__":
    sys.exit(main())
