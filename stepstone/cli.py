"""The ``stepstone`` command line. Every command calls the public Python API.

    stepstone tasks
    stepstone registry build --registry DIR --sources builtin:all
    stepstone registry list|show ID|verify|repair|remove ID|import-hfselect PATH...
    stepstone transfer builtin:ID --source auto --lr-distribution flat:2e-5 kenneweg
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepstone.esm.errors import ConfigError, StepstoneError

logger = logging.getLogger("stepstone")


# -- dataclass <-> argparse: the CLI options are the config fields ---------------------
def _field_type(tp: Any) -> type:
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "str": str, "bool": bool}.get(
            tp.replace(" | None", ""), str)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return args[0]
    return tp


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                    skip: Sequence[str] = ()) -> None:
    """Add one ``--prefix-field`` option per scalar dataclass field, with its help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        tp = _field_type(hints[f.name])
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f.metadata.get("help", "") + f" (default: {default})"
        if tp is bool:
            parser.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=prefix + f.name, type=tp, default=None, help=helptext)


def config_from_args(cls: type, args: argparse.Namespace, *, prefix: str = "",
                     base: Any = None, **nested) -> Any:
    """The ``cls`` config from the options :func:`add_config_args` added: the options
    given on the command line over ``base`` (an instance; default: the field defaults)."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
              if f.name not in nested and getattr(args, prefix + f.name, None) is not None}
    if base is not None:
        return dataclasses.replace(base, **values, **nested)
    return cls(**values, **nested)


# -- output helpers ---------------------------------------------------------------------
def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _print_table(frame) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.max_columns", None,
                           "display.width", 200, "display.max_colwidth", 60):
        print(frame.to_string(index=False))


# -- commands ---------------------------------------------------------------------------
def cmd_tasks(args: argparse.Namespace) -> int:
    from stepstone.esm.catalog import catalog_table

    table = catalog_table()
    if args.json:
        _print_json(json.loads(table.to_json(orient="records")))
        return 0
    _print_table(table.drop(columns=["description", "license", "install"]))
    missing = table.loc[~table["available"], ["package", "install"]].drop_duplicates()
    if len(missing):
        print("\nMissing (package not installed); add with:")
        for package, hint in missing.itertuples(index=False):
            tasks = table.loc[table["package"] == package, "id"].tolist()
            print(f"  {hint}    # {', '.join(tasks)}")
    return 0


def _encoder_from_args(args: argparse.Namespace):
    from stepstone.esm.encoder import load_encoder

    return load_encoder(args.encoder, pooling=args.pooling, max_length=args.max_length,
                        layer=getattr(args, "layer", None))


def cmd_registry_build(args: argparse.Namespace) -> int:
    from stepstone.esm.cache import EmbeddingCache
    from stepstone.esm.model import ESMFitSettings
    from stepstone.finetune.build import BuildSettings, build_registry
    from stepstone.finetune.executor import ExecutorSettings, ExecutorUnavailableError
    from stepstone.finetune.train import FinetuneSettings

    settings = config_from_args(
        BuildSettings, args, exit_layers=tuple(args.exit_layers or ()),
        finetune=config_from_args(FinetuneSettings, args, prefix="ft_"),
        esm_fit=config_from_args(ESMFitSettings, args, prefix="esm_"))
    executor = config_from_args(ExecutorSettings, args)
    encoder = _encoder_from_args(args)
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir)
    try:
        report = build_registry(args.registry, args.sources, encoder=encoder,
                                settings=settings, cache=cache, progress=not args.quiet,
                                task_options=_task_options(args), executor=executor)
    except ExecutorUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
    return 1 if report.failed else 0


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if getattr(args, "text_column", None):
        cols = args.text_column
        opts["text_column"] = cols[0] if len(cols) == 1 else cols
    if getattr(args, "label_column", None):
        opts["label_column"] = args.label_column
    if getattr(args, "label_kind", None):
        opts["label_kind"] = args.label_kind
    if getattr(args, "drop_invalid", False):
        opts["drop_invalid"] = True
    if getattr(args, "on_conflict", None):
        opts["conflicts"] = args.on_conflict
    if getattr(args, "encoding", None):
        opts["encoding"] = args.encoding
    return opts


def _open(args: argparse.Namespace, *, write: bool = False):
    from stepstone.esm.registry import Registry, open_registry

    if write:  # the parser makes --registry required for these commands
        create = getattr(args, "create", False)
        return Registry(args.registry, "w", create=create)
    return open_registry(args.registry)  # read-only: changes nothing on disk


def cmd_registry_list(args: argparse.Namespace) -> int:
    import pandas as pd

    reg = _open(args)
    rows = [e.to_dict() for e in reg.entries()]
    if args.json:
        _print_json({"registry": str(reg.path), "esms": rows})
        return 0
    print(f"registry {reg.path}: {len(rows)} ESMs")
    if rows:
        cols = ["id", "task_id", "base_model", "architecture", "in_dim", "num_examples",
                "label_kind", "num_classes", "size_bytes", "has_model"]
        _print_table(pd.DataFrame(rows)[cols])
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    reg = _open(args)
    entry = reg.get(args.id)
    data = {"entry": entry.to_dict(), "config": reg.config(args.id).to_dict()}
    if args.json:
        _print_json(data)
    else:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    return 0


def cmd_registry_verify(args: argparse.Namespace) -> int:
    if args.repair:
        return cmd_registry_repair(args)
    reg = _open(args)
    report = reg.verify()
    if args.json:
        _print_json({"ok": report.ok, "checked": report.checked, "problems": report.problems,
                     "notes": report.notes})
    else:
        print(report)
    return 0 if report.ok else 1


def cmd_registry_repair(args: argparse.Namespace) -> int:
    from stepstone.esm.registry import repair_registry

    if args.registry is None:
        raise ConfigError("Repairing needs --registry DIR; the shipped registry is read-only.")
    report = repair_registry(args.registry)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
    return 0 if not report.remaining and not report.refused else 1


def cmd_registry_remove(args: argparse.Namespace) -> int:
    reg = _open(args, write=True)
    for esm_id in args.ids:
        reg.remove(esm_id)
    if args.json:
        _print_json({"removed": args.ids})
    else:
        print(f"removed {len(args.ids)}: {', '.join(args.ids)}")
    return 0


def cmd_registry_import(args: argparse.Namespace) -> int:
    from stepstone.esm.hfselect import import_hfselect

    args.create = True
    reg = _open(args, write=True)
    added, skipped, failed = [], [], {}
    for path in args.paths:  # a bad folder is reported; the others still import
        try:
            entry = import_hfselect(reg, path)
        except StepstoneError as err:
            failed[path] = str(err)
            continue
        (skipped.append(path) if entry is None else added.append(entry.id))
    if args.json:
        _print_json({"added": added, "skipped": skipped, "failed": failed})
    else:
        print(f"imported {len(added)}, skipped {len(skipped)} (already present), "
              f"failed {len(failed)}")
        for esm_id in added:
            print(f"  {esm_id}")
        for path, msg in failed.items():
            print(f"  failed {path}: {msg}")
    return 1 if failed else 0


def _check_side_file(flag: str, path: str | None) -> None:
    """Refuse, before any work, a side-file path that cannot be written; a missing folder
    is fine (it is created when the file is written)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} must name a file; got the folder {path!r}.")
    folder = next(p for p in target.absolute().parents if p.exists())
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path!r} cannot be written: {str(folder)!r} is a file.")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {path!r} cannot be written: no permission in "
                          f"{str(folder)!r}.")


def cmd_rank(args: argparse.Namespace) -> int:
    from stepstone.selection.ranking import rank

    _check_side_file("--csv", args.csv)
    _check_side_file("--plot", args.plot)
    ranking = rank(
        args.target, args.registry, args.method,
        encoder=args.encoder, pooling=args.pooling, max_length=args.max_length, top=args.top,
        prefilter=args.prefilter, approx_rank=args.approx_rank, layer=args.layer,
        max_examples=args.max_examples, cache=not args.no_cache,
        exclude_target=not args.include_target, progress=not args.quiet and not args.json,
        task_options=_task_options(args))
    if args.json:
        _print_json(ranking.to_dict())
    else:
        print(ranking)
        t, st = ranking.timings, ranking.settings
        print(f"\n{st['candidates']} candidates, {st['target_examples']} target examples; "
              f"embed {t['embed']:.2f}s, score {t['score']:.2f}s, "
              f"total {t['total']:.2f}s")
    # Side files after the ranking is shown: a failed write never hides it.
    if args.csv:
        ranking.to_csv(args.csv)
    if args.plot:
        ranking.plot(args.plot)
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from stepstone.finetune.stabilize import StabilizerSettings
    from stepstone.finetune.train import FinetuneSettings
    from stepstone.finetune.transfer import LRSearchSettings, TransferSettings, transfer

    settings = config_from_args(TransferSettings, args,
                                finetune=config_from_args(FinetuneSettings, args, prefix="ft_"))
    search = config_from_args(LRSearchSettings, args, prefix="search_")
    stabilizer = config_from_args(StabilizerSettings, args, prefix="stab_", kind=args.stabilizer)
    report = transfer(
        args.target, args.source, registry=args.registry, encoder=args.encoder,
        lr_distributions=args.lr_distribution, settings=settings, search=search, out=args.out,
        method=args.method, overwrite=args.overwrite, progress=not args.quiet and not args.json,
        plots=not args.no_plots, task_options=_task_options(args), stabilizer=stabilizer)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
        print(f"\nReport: {args.out}/report.md (and report.json"
              + (", lr.png, drift.png, curves.png, retention_gain.png" if not args.no_plots
                 else "") + ")")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    from stepstone.esm.specs import load_task
    from stepstone.finetune.kernel import (
        FewShotFinetuneSettings,
        kernel_vs_finetune,
        source_encoder,
    )
    from stepstone.finetune.train import FinetuneSettings
    from stepstone.selection.entk import KernelError
    from stepstone.selection.entk_solvers import KernelSettings

    try:
        settings = config_from_args(KernelSettings, args)
        ft = config_from_args(FewShotFinetuneSettings, args, prefix="ft_")
        task = load_task(args.target, **_task_options(args))
        encoder = _encoder_from_args(args)
        progress = not args.quiet and not args.json
        if args.source:
            encoder = source_encoder(
                args.source, encoder, registry=args.registry,
                max_examples=args.source_max_examples,
                settings=config_from_args(FinetuneSettings, args, prefix="src_"),
                progress=progress)
        report = kernel_vs_finetune(task, encoder, shots=args.shots, seed=args.seed,
                                    settings=settings, finetune_settings=ft,
                                    max_eval=args.max_eval, run_finetune=not args.no_finetune,
                                    source=args.source, progress=progress)
    except KernelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
    return 0


# -- parser -----------------------------------------------------------------------------
def _layer_arg(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    from stepstone.esm.encoder import DEFAULT_ENCODER, POOLINGS

    p.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help=f"Model package, folder or Hub id (default: {DEFAULT_ENCODER}).")
    p.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="Pooling (default: what the model declares, else mean).")
    p.add_argument("--max-length", type=int, default=None, help="Token limit (default 128).")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", nargs="+", default=None,
                   help="Text column of a local/Hub dataset (two for sentence pairs).")
    p.add_argument("--label-column", default=None, help="Label column (default: label).")
    p.add_argument("--label-kind", choices=["classification", "regression"], default=None,
                   help="Label kind (default: inferred).")
    p.add_argument("--drop-invalid", action="store_true",
                   help="Drop rows with a missing text or label (or a non-numeric label "
                        "for regression) instead of failing.")
    p.add_argument("--on-conflict", choices=["error", "drop"], default=None,
                   help="A text that appears with different labels: refuse the data "
                        "(error) or drop every row of it (drop) (default: error).")
    p.add_argument("--encoding", default=None,
                   help="Text encoding of a local CSV/TSV/JSON/JSONL file, e.g. latin-1 "
                        "(default: utf-8).")


def build_parser() -> argparse.ArgumentParser:
    from stepstone.esm.model import ESMFitSettings
    from stepstone.finetune.build import BuildSettings
    from stepstone.finetune.executor import ExecutorSettings
    from stepstone.finetune.train import FinetuneSettings

    parser = argparse.ArgumentParser(
        prog="stepstone",
        description="Choose the intermediate task to fine-tune on first, and carry it through.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="More logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="List the built-in task catalog.")
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.set_defaults(func=cmd_tasks)

    from stepstone.selection.ranking import DEFAULT_MAX_TARGET
    from stepstone.selection.scorers import available_methods

    p = sub.add_parser("rank", help="Rank a registry's sources for a target dataset.")
    p.add_argument("target", help="builtin:ID, a local file, or a Hub dataset name.")
    p.add_argument("--registry", default=None, help="Registry folder (default: shipped).")
    p.add_argument("--method", choices=available_methods(), default="esm-logme",
                   help="Scoring method ('kernel': eNTK accuracy per kept source model; slow).")
    p.add_argument("--top", type=int, default=None, help="Show the best K sources only.")
    p.add_argument("--prefilter", type=int, default=None,
                   help="Rerank only the K nearest sources in the FAISS task index.")
    p.add_argument("--approx-rank", type=int, default=None,
                   help="ESM-LogME approximation: keep the target's top-r directions.")
    p.add_argument("--layer", type=_layer_arg, default=None,
                   help="Early exit: embed with the first K encoder layers, or 'auto'.")
    p.add_argument("--max-examples", type=int, default=DEFAULT_MAX_TARGET, dest="max_examples",
                   help=f"Cap on target examples (default {DEFAULT_MAX_TARGET}).")
    p.add_argument("--encoder", default=None,
                   help="Encoder (default: the one the registry was built with).")
    p.add_argument("--pooling", choices=["mean", "cls", "pooler"], default=None,
                   help="Pooling (default: the registry's).")
    p.add_argument("--max-length", type=int, default=None,
                   help="Token limit (default: the registry's).")
    p.add_argument("--include-target", action="store_true",
                   help="Keep the target's own task among the candidates.")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.add_argument("--csv", default=None, help="Also write the table to this CSV file.")
    p.add_argument("--plot", default=None, help="Also draw the scores to this PNG file.")
    p.add_argument("--no-cache", action="store_true", help="Do not use the embedding cache.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=cmd_rank)

    from stepstone.finetune.stabilize import STABILIZERS, StabilizerSettings
    from stepstone.finetune.transfer import LRSearchSettings, TransferSettings

    p = sub.add_parser(
        "transfer", help="Fine-tune on a source, then on the target; measure gain and forgetting.")
    p.add_argument("target", help="builtin:ID, a local file, or a Hub dataset name.")
    p.add_argument("--source", default="auto",
                   help="'auto' (top of rank), an ESM or task id in the registry, or a task "
                        "spec (default: auto).")
    p.add_argument("--registry", default=None, help="Registry folder (default: shipped).")
    p.add_argument("--method", choices=available_methods(), default="esm-logme",
                   help="Ranking method for --source auto.")
    p.add_argument("--lr-distribution", nargs="+", default=None,
                   help="One or more: flat:LR, llrd:LR,DECAY, kenneweg[:BASE], a JSON file, or "
                        "'search' (optuna). Several are compared on the same source models "
                        "(default: flat at --ft-lr).")
    p.add_argument("--out", default="transfer-out",
                   help="Output folder; rerunning with the same arguments resumes.")
    p.add_argument("--overwrite", action="store_true",
                   help="Discard results in --out made with other settings.")
    p.add_argument("--encoder", default=None,
                   help="Encoder (default: the one the registry was built with).")
    add_config_args(p, TransferSettings)
    add_config_args(p, FinetuneSettings, prefix="ft_", skip=("seed",))
    add_config_args(p, LRSearchSettings, prefix="search_")
    p.add_argument("--stabilizer", choices=STABILIZERS, default="none",
                   help="Stabilise both target fine-tunings: ensemble (M seeds, vote), swa, or "
                        "deni (Pecher et al. 2024); options as --stab-* (default: none).")
    add_config_args(p, StabilizerSettings, prefix="stab_", skip=("kind",))
    _add_data_args(p)
    p.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=cmd_transfer)

    from stepstone.finetune.kernel import FewShotFinetuneSettings
    from stepstone.selection.entk_solvers import KernelSettings

    p = sub.add_parser(
        "kernel", help="eNTK (kernel) prediction of few-shot fine-tuning, beside the real thing.")
    p.add_argument("target", help="builtin:ID, a local file, or a Hub dataset name.")
    p.add_argument("--source", default=None,
                   help="Take the kernel of the encoder tuned on this source: an ESM id with a "
                        "kept model in --registry, or a built-in task id (fine-tuned here).")
    p.add_argument("--registry", default=None, help="Registry folder (default: shipped).")
    p.add_argument("--source-max-examples", type=int, default=500,
                   help="Cap on source examples when fine-tuning a built-in source (default 500).")
    p.add_argument("--shots", type=int, default=16, help="Training examples per class (16).")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the sample, the head init and fine-tuning (0).")
    p.add_argument("--max-eval", type=int, default=500,
                   help="Cap on target test examples (stratified; default 500).")
    p.add_argument("--no-finetune", action="store_true",
                   help="Only the kernel prediction; skip the actual fine-tuning.")
    _add_encoder_args(p)
    _add_data_args(p)
    add_config_args(p, KernelSettings)
    add_config_args(p, FewShotFinetuneSettings, prefix="ft_", skip=("seed",))
    add_config_args(p, FinetuneSettings, prefix="src_", skip=("seed",))
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=cmd_kernel)

    reg = sub.add_parser("registry", help="Build and inspect ESM registries.")
    rsub = reg.add_subparsers(dest="registry_command", required=True)

    def common(p, *, default_ok: bool = True):
        # Commands that write need an explicit folder: the shipped registry is read-only.
        p.add_argument("--registry", default=None, required=not default_ok,
                       help="Registry folder" + (" (default: the shipped registry)."
                                                 if default_ok else "."))
        p.add_argument("--json", action="store_true", help="Machine-readable output.")

    p = rsub.add_parser("build", help="Fine-tune on each source and add its ESM.")
    common(p, default_ok=False)
    p.add_argument("--sources", nargs="+", required=True,
                   help="builtin:all, task ids (a,b), local files or Hub names.")
    _add_encoder_args(p)
    _add_data_args(p)
    add_config_args(p, BuildSettings, skip=("exit_layers",))
    p.add_argument("--exit-layers", nargs="*", type=int, default=None,
                   help="Also fit ESMs from these early-exit layers (one fine-tune per source).")
    add_config_args(p, FinetuneSettings, prefix="ft_")
    add_config_args(p, ESMFitSettings, prefix="esm_")
    add_config_args(p, ExecutorSettings)
    p.add_argument("--cache-dir", default=None, help="Embedding cache folder.")
    p.add_argument("--no-cache", action="store_true", help="Do not use the embedding cache.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=cmd_registry_build)

    p = rsub.add_parser("list", help="List the ESMs.")
    common(p)
    p.set_defaults(func=cmd_registry_list)
    p = rsub.add_parser("show", help="Show one ESM's row and config.")
    common(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_registry_show)
    p = rsub.add_parser("verify", help="Check ids, checksums, weights and that rows and files "
                                       "agree; changes nothing (unless --repair).")
    common(p)
    p.add_argument("--repair", action="store_true", help="Repair instead (see `repair`).")
    p.set_defaults(func=cmd_registry_verify)
    p = rsub.add_parser(
        "repair", help="Finish or undo interrupted writes, rebuild a missing or empty manifest "
                       "and add rows for ESM folders that lack one (checksums recomputed); "
                       "deletes no file.")
    common(p, default_ok=False)
    p.set_defaults(func=cmd_registry_repair)
    p = rsub.add_parser("remove", help="Remove ESMs by id.")
    common(p, default_ok=False)
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_registry_remove)
    p = rsub.add_parser("import-hfselect", help="Import hf-dataset-selector ESM folders.")
    common(p, default_ok=False)
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_registry_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # The CLI is one process that never forks tokenizers; silence their fork warning.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except StepstoneError as err:  # anything else is a bug: its traceback shows
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
