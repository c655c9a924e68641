"""Weight conversion command line: `python -m tools.convert_weights <subcommand> ...`.

Each subcommand is a module with `add_arguments(parser)` and `run(args)`; its docstring's first line is
the help text. Add a family by adding one entry to SUBCOMMANDS.
"""
import argparse
import importlib

SUBCOMMANDS = {
    "sd15-inpaint": "tools.convert_weights.sd15",
    "export-sd15": "tools.convert_weights.sd15_export",
    "flux-fill": "tools.convert_weights.flux_cli",
    "flux-kontext": "tools.convert_weights.flux_cli",
    "flux-dev": "tools.convert_weights.flux_cli",
    "export-flux": "tools.convert_weights.flux_export",
    "calligrapher": "tools.convert_weights.calligrapher",
    "export-calligrapher": "tools.convert_weights.calligrapher",
    "sd3": "tools.convert_weights.sd3_cli",
    "export-sd3": "tools.convert_weights.sd3_export",
    "qwen-image-edit": "tools.convert_weights.qwen_image_cli",
    "qwen-image": "tools.convert_weights.qwen_image_cli",
    "export-qwen-image": "tools.convert_weights.qwen_image_export",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_weights", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=modules[name].__doc__.split("\n")[0], description=modules[name].__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        modules[name].add_arguments(sub)
    args = parser.parse_args(argv)
    modules[args.command].run(args)


if __name__ == "__main__":
    main()
