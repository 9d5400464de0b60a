"""The ``stepstone`` command line. Every command calls the public Python API.

    stepstone tasks
    stepstone registry build --registry DIR --sources builtin:all
    stepstone registry list|show ID|verify|repair|remove ID|import-hfselect PATH_OR_REPO...
    stepstone registry export-hfselect ID... --out DIR [--push REPO]
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
    outside = table.loc[~table["pool"], "id"].tolist()
    if outside:
        print(f"\n`all` means the {int(table['pool'].sum())} tasks of the benchmark pool; "
              f"outside it (loadable by id): {', '.join(outside)}.")
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
    one_source = [flag for flag, value in (("--name", args.name), ("--test-file",
                                                                   args.test_file))
                  if value]
    if one_source:
        from stepstone.esm.specs import expand_specs

        if len(expand_specs(args.sources)) != 1:
            raise ConfigError(f"{one_source[0]} applies to one source; got --sources "
                              f"{' '.join(args.sources)} (build them one at a time).")
    encoder = _encoder_from_args(args)
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir)
    try:
        report = build_registry(args.registry, args.sources, encoder=encoder,
                                settings=settings, cache=cache, progress=not args.quiet,
                                task_options=_task_options(args), executor=executor)
    except ExecutorUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _refresh_indexes(args.registry, report.added)
    added = _added_esms(args.registry, report.added)
    if args.json:
        _print_json({**report.to_dict(), "added_esms": added})
    else:
        print(report)
        for esm in added:
            test = ", ".join(f"{k} {v:.3f}" for k, v in esm["source_test"].items())
            print(f"  new ESM {esm['id']} (task {esm['task_id']}): source model on its "
                  f"test split: {test or 'not measured'}")
    return 1 if report.failed else 0


def _refresh_indexes(registry: str | None, changed: Sequence[str]) -> None:
    """Update the registry's FAISS indexes incrementally after a change (only the new
    ESMs are read), so the next ranking does not pay for it."""
    if not changed or registry is None:
        return
    from stepstone.esm.registry import Registry
    from stepstone.selection.index import update_indexes

    with Registry(registry, "w") as reg:
        update_indexes(reg)


def _added_esms(registry: str, ids: Sequence[str]) -> list[dict[str, Any]]:
    """Id, task and the fine-tuned source model's test metrics of each new ESM."""
    from stepstone.esm.registry import open_registry

    if not ids:
        return []
    reg = open_registry(registry)
    out = []
    for esm_id in ids:
        metrics = reg.config(esm_id).metrics
        out.append({"id": esm_id, "task_id": reg.get(esm_id).task_id,
                    "source_test": {k.removeprefix("source_test_"): v for k, v in
                                    metrics.items() if k.startswith("source_test_")}})
    return out


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
    for flag, key in (("test_file", "test_file"), ("test_split", "test_split"),
                      ("name", "task_id")):
        if getattr(args, flag, None):
            opts[key] = getattr(args, flag)
    return opts


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    """The source's own data options (``--source-text-column`` ...), never the target's."""
    opts: dict[str, Any] = {}
    if args.source_text_column:
        cols = args.source_text_column
        opts["text_column"] = cols[0] if len(cols) == 1 else cols
    for flag, key in (("source_label_column", "label_column"),
                      ("source_test_file", "test_file")):
        if getattr(args, flag):
            opts[key] = getattr(args, flag)
    return opts


def _open(args: argparse.Namespace, *, write: bool = False):
    from stepstone.esm.registry import Registry, open_registry

    if write:  # the parser makes --registry required for these commands
        create = getattr(args, "create", False)
        return Registry(args.registry, "w", create=create)
    return open_registry(args.registry)  # read-only: changes nothing on disk


def cmd_registry_list(args: argparse.Namespace) -> int:
    import pandas as pd

    from stepstone.esm.filters import filter_entries

    reg = _open(args)
    narrowed = filter_entries(reg, reg.entries(), _filters_from_args(args))
    rows = [e.to_dict() for e in narrowed.kept]
    if args.json:
        _print_json({"registry": str(reg.path), "esms": rows,
                     "filtered_out": narrowed.filtered})
        return 0
    print(f"registry {reg.path}: {len(rows)} ESMs"
          + (f" ({narrowed.summary()})" if narrowed.filtered else ""))
    if rows:
        cols = ["id", "task_id", "base_model", "architecture", "in_dim", "num_examples",
                "label_kind", "num_classes", "size_bytes", "has_model"]
        _print_table(pd.DataFrame(rows)[cols])
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    reg = _open(args)
    entry = reg.resolve(args.id)  # an ESM id, or a task id with one ESM
    data = {"entry": entry.to_dict(), "config": reg.config(entry.id).to_dict()}
    if args.json:
        _print_json(data)
    else:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    return 0


def cmd_registry_verify(args: argparse.Namespace) -> int:
    if args.repair:
        return cmd_registry_repair(args)
    from stepstone.selection.index import check_indexes

    reg = _open(args)
    report = reg.verify()
    report.problems += check_indexes(reg)  # a current FAISS index must match the manifest
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
    if args.ids:
        from stepstone.selection.index import update_indexes

        update_indexes(reg)
    if args.json:
        _print_json({"removed": args.ids})
    else:
        print(f"removed {len(args.ids)}: {', '.join(args.ids)}")
    return 0


def _import_encoder(args: argparse.Namespace):
    """The encoder ``import-hfselect --encoder`` names (loaded once), or None."""
    if getattr(args, "encoder", None) is None:
        return None
    if getattr(args, "_loaded_encoder", None) is None:
        from stepstone.esm.encoder import DEFAULT_MAX_LENGTH, load_encoder

        # only its weights fingerprint and model type are read: the pooling recorded is
        # the peer's for the ESM's base model (stepstone.esm.hfselect.peer_pooling)
        args._loaded_encoder = load_encoder(args.encoder, pooling="mean",
                                            max_length=DEFAULT_MAX_LENGTH)
    return args._loaded_encoder


def cmd_registry_import(args: argparse.Namespace) -> int:
    from stepstone.esm.hfselect import import_hfselect
    from stepstone.esm.hub import find_hub_esms, import_from_hub, is_hub_repo_id

    if args.from_hub and not args.base_model:
        raise ConfigError("--from-hub discovers the ESMs of one base model; give it with "
                          "--base-model NAME (a Hub id, e.g. sentence-transformers/"
                          "all-MiniLM-L6-v2).")
    if not args.from_hub and not args.paths:
        raise ConfigError("Give ESM folders or Hub repo ids, or --from-hub --base-model NAME.")
    repos = [p for p in args.paths if is_hub_repo_id(p)]
    if args.from_hub:
        found = find_hub_esms(args.base_model, cache_dir=args.hub_cache)
        if not found and not args.json:
            print(f"no ESMs for base model {args.base_model!r} found on the Hub (offline: in "
                  "the local Hub cache)")
        repos += found
    args.create = True
    reg = _open(args, write=True)
    added, skipped, failed = [], [], {}
    unmatched: dict[str, str] = {}  # ESM id -> an encoder name that matches no installed one
    if repos:
        report = import_from_hub(reg, repos, base_model=args.base_model,
                                 encoder=_import_encoder(args), cache_dir=args.hub_cache,
                                 workers=args.workers, progress=not args.quiet and not args.json)
        added += list(report.added.values())
        unmatched.update({i: reg.get(i).base_model for i in report.added.values()
                          if not reg.get(i).fingerprint})
        skipped += report.skipped
        failed.update(report.failed)
        if report.offline and not args.json:
            print("offline (HF_HUB_OFFLINE=1): repos read from the local Hub cache only")
    for path in args.paths:  # a bad folder is reported; the others still import
        if path in repos:
            continue
        try:
            entry = import_hfselect(reg, path, encoder=_import_encoder(args))
        except StepstoneError as err:
            failed[path] = str(err)
            continue
        (skipped.append(path) if entry is None else added.append(entry.id))
        if entry is not None and not entry.fingerprint:
            unmatched[entry.id] = entry.base_model
    if added:
        from stepstone.selection.index import update_indexes

        update_indexes(reg)
    if args.json:
        _print_json({"added": added, "skipped": skipped, "failed": failed,
                     "unmatched_encoder": unmatched})
    else:
        print(f"imported {len(added)}, skipped {len(skipped)} (already present), "
              f"failed {len(failed)}")
        for esm_id in added:
            print(f"  {esm_id}")
        for esm_id, name in unmatched.items():
            print(f"  warning: {esm_id} records encoder {name!r}, which matches no installed "
                  "encoder; `rank` lists it as skipped. Re-import it with --encoder NAME|DIR "
                  "naming the encoder it was trained on.")
        for path, msg in failed.items():
            print(f"  failed {path}: {msg}")
    return 1 if failed else 0


def cmd_registry_export(args: argparse.Namespace) -> int:
    from stepstone.esm.hfselect_export import export_hfselect
    from stepstone.esm.hub import push_hfselect

    if args.push and len(args.ids) != 1:
        raise ConfigError(f"--push uploads one ESM to one repo; got {len(args.ids)} ids.")
    reg = _open(args)
    out = Path(args.out)
    folders = {}
    for esm_id in args.ids:  # all are checked before any is written
        reg.get(esm_id)
    for esm_id in args.ids:
        folders[esm_id] = export_hfselect(reg, esm_id, out / esm_id, base_model=args.base_model,
                                          license=args.license)
    pushed = push_hfselect(folders[args.ids[0]], args.push) if args.push else None
    if args.json:
        _print_json({"exported": {k: str(v) for k, v in folders.items()}, "pushed": pushed})
    else:
        for esm_id, folder in folders.items():
            print(f"exported {esm_id} -> {folder}")
        if pushed:
            print(f"pushed to {args.push}: {pushed}")
    return 0


def _add_filter_args(p: argparse.ArgumentParser) -> None:
    from stepstone.esm.filters import CandidateFilter

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(CandidateFilter)}
    p.add_argument("--where", action="append", default=None, metavar="COND",
                   help=helps["where"] + " Repeatable; see `stepstone.esm.filters`.")
    p.add_argument("--include", nargs="+", action="extend", default=None, metavar="GLOB",
                   help=helps["include"])
    p.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="GLOB",
                   help=helps["exclude"])


def _filters_from_args(args: argparse.Namespace):
    from stepstone.esm.filters import CandidateFilter

    return CandidateFilter(where=tuple(args.where or ()), include=tuple(args.include or ()),
                           exclude=tuple(args.exclude or ()))


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
    filters = _filters_from_args(args)
    ranking = rank(
        args.target, args.registry, args.method,
        encoder=args.encoder, pooling=args.pooling, max_length=args.max_length, top=args.top,
        prefilter=args.prefilter, layer=args.layer,
        max_examples=args.max_examples, cache=not args.no_cache,
        exclude_target=not args.include_target, progress=not args.quiet and not args.json,
        task_options=_task_options(args), check_leakage=not args.no_leakage_check,
        filters=filters, gain=False if args.no_gain else (args.gain_model or True),
        min_gain=args.min_gain)
    rec = ranking.recommendation
    if args.json:
        _print_json(ranking.to_dict())
    else:
        # the recommendation is the output's last line, after the run's numbers
        text = str(ranking)
        print(text.removesuffix("\n" + str(rec)) if rec is not None else text)
        t, st = ranking.timings, ranking.settings
        print(f"\n{st['candidates']} candidates, {st['target_examples']} target examples; "
              f"embed {t['embed']:.2f}s, score {t['score']:.2f}s, "
              f"total {t['total']:.2f}s")
        if st.get("filtered_out"):
            print(f"{sum(st['filtered_out'].values())} candidate(s) filtered out: "
                  + "; ".join(f"{n} {rule.removeprefix('filtered out: ')}"
                              for rule, n in st["filtered_out"].items()))
        if rec is not None:
            print(rec)
    # Side files after the ranking is shown: a failed write never hides it.
    if args.csv:
        ranking.to_csv(args.csv)
    if args.plot:
        ranking.plot(args.plot)
    return 0


def cmd_gain_fit(args: argparse.Namespace) -> int:
    from stepstone.selection.gain import DEFAULT_ALPHA, DEFAULT_LEVEL
    from stepstone.selection.gain_fit import fit_from_matrix

    _check_side_file("--out", args.out)
    model, _ = fit_from_matrix(
        args.matrix, args.registry, scores=args.scores, protocol_key=args.protocol,
        metric=args.metric, alpha=DEFAULT_ALPHA if args.alpha is None else args.alpha,
        level=DEFAULT_LEVEL if args.level is None else args.level, tasks=args.tasks,
        progress=not args.quiet and not args.json)
    path = model.save(args.out)
    if args.json:
        _print_json(model.to_dict())
    else:
        print(model)
        print(f"\nwritten to {path}")
    return 0


def cmd_gain_show(args: argparse.Namespace) -> int:
    from stepstone.selection.gain import load_gain_model

    model = load_gain_model(args.path)
    if args.json:
        _print_json(model.to_dict())
    else:
        print(model)
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from stepstone.finetune.stabilize import StabilizerSettings
    from stepstone.finetune.train import FinetuneSettings
    from stepstone.finetune.transfer import LRSearchSettings, TransferSettings, transfer

    settings = config_from_args(TransferSettings, args,
                                finetune=config_from_args(FinetuneSettings, args, prefix="ft_"))
    search = config_from_args(LRSearchSettings, args, prefix="search_")
    stabilizer = config_from_args(StabilizerSettings, args, prefix="stab_", kind=args.stabilizer)
    from stepstone.selection.gain import NoSourceRecommended

    try:
        report = transfer(
            args.target, args.source, registry=args.registry, encoder=args.encoder,
            lr_distributions=args.lr_distribution, settings=settings, search=search,
            out=args.out, method=args.method, overwrite=args.overwrite,
            progress=not args.quiet and not args.json, plots=not args.no_plots,
            task_options=_task_options(args), stabilizer=stabilizer,
            source_options=_source_options(args), allow_leakage=args.allow_leakage,
            force=args.force)
    except NoSourceRecommended as err:  # a verdict, not a failure: nothing was trained
        if args.json:
            _print_json({"declined": True, "reason": str(err)})
        else:
            print(f"declined: {err}")
        return 3
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


def _add_target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="builtin:ID, a local file, or a Hub dataset name.")


def _add_registry_arg(p: argparse.ArgumentParser, *, default_ok: bool = True) -> None:
    # Commands that write need an explicit folder: the shipped registry is read-only.
    p.add_argument("--registry", default=None, required=not default_ok,
                   help="Registry folder" + (" (default: the shipped registry)."
                                             if default_ok else "."))


def _add_output_args(p: argparse.ArgumentParser, *, json_help: str = "Machine-readable output.",
                     quiet: bool = True) -> None:
    p.add_argument("--json", action="store_true", help=json_help)
    if quiet:
        p.add_argument("--quiet", action="store_true", help="No progress bars.")


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
    p.add_argument("--test-file", default=None,
                   help="The test data of a local file dataset (same columns). Default: a "
                        "stratified 20%% of the rows is held out (seed 0).")
    p.add_argument("--test-split", default=None,
                   help="The test split of a Hub dataset (default: 'test', else "
                        "'validation', else 20%% of 'train' held out).")
    p.add_argument("--name", default=None,
                   help="Task name (default: the file's stem, or its folder's name when the "
                        "stem is a split name such as train or test).")


def build_parser() -> argparse.ArgumentParser:
    from stepstone.esm.model import ESMFitSettings
    from stepstone.finetune.build import BuildSettings
    from stepstone.finetune.executor import ExecutorSettings
    from stepstone.finetune.train import FinetuneSettings

    parser = argparse.ArgumentParser(
        prog="stepstone",
        description="Choose the intermediate task to fine-tune on first, and carry it through.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="More logging.")
    from stepstone.esm import __version__

    parser.add_argument("--version", action="version", version=f"stepstone {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="List the built-in task catalog.")
    _add_output_args(p, quiet=False)
    p.set_defaults(func=cmd_tasks)

    from stepstone.selection.ranking import DEFAULT_MAX_TARGET
    from stepstone.selection.scorers import available_methods

    p = sub.add_parser("rank", help="Rank a registry's sources for a target dataset.")
    _add_target_arg(p)
    _add_registry_arg(p)
    p.add_argument("--method", choices=available_methods(), default="esm-logme",
                   help="Scoring method ('kernel': eNTK accuracy per kept source model; slow).")
    p.add_argument("--top", type=int, default=None, help="Show the best K sources only.")
    p.add_argument("--prefilter", type=int, default=None,
                   help="Score only the K candidates the FAISS ESM sketch index (a "
                        "first-order model of ESM-LogME) ranks highest.")
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
    _add_filter_args(p)
    p.add_argument("--include-target", action="store_true",
                   help="Keep ESMs built from the target's own data (same data hash) among "
                        "the candidates.")
    p.add_argument("--no-leakage-check", action="store_true",
                   help="Skip counting the target texts each source holds (exact and "
                        "normalised matches).")
    p.add_argument("--gain-model", default=None,
                   help="Gain model JSON for the predicted gains and the recommendation "
                        "(default: the shipped one; `stepstone gain fit` makes one).")
    p.add_argument("--no-gain", action="store_true",
                   help="Rank only: no predicted gains, no recommendation.")
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="Recommend a source only when its predicted gain exceeds this many "
                        "points (default 0).")
    _add_data_args(p)
    _add_output_args(p)
    p.add_argument("--csv", default=None, help="Also write the table to this CSV file.")
    p.add_argument("--plot", default=None, help="Also draw the scores to this PNG file.")
    p.add_argument("--no-cache", action="store_true", help="Do not use the embedding cache.")
    p.set_defaults(func=cmd_rank)

    from stepstone.finetune.stabilize import STABILIZERS, StabilizerSettings
    from stepstone.finetune.transfer import LRSearchSettings, TransferSettings

    p = sub.add_parser(
        "transfer", help="Fine-tune on a source, then on the target; measure gain and forgetting.")
    _add_target_arg(p)
    p.add_argument("--source", default="auto",
                   help="'auto' (the gain model's recommendation; the top of rank when no "
                        "gain model applies), an ESM or task id in the registry, or a task "
                        "spec (default: auto).")
    _add_registry_arg(p)
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
    p.add_argument("--source-text-column", nargs="+", default=None,
                   help="Text column of a source given as a file or Hub name (two for "
                        "sentence pairs); a registry ESM reloads its data with the columns "
                        "recorded at build (default: text).")
    p.add_argument("--source-label-column", default=None,
                   help="Label column of the source's data (default: label, or as "
                        "recorded).")
    p.add_argument("--source-test-file", default=None,
                   help="The source's own test data file (default: as recorded, or 20%% "
                        "of its rows held out).")
    p.add_argument("--force", action="store_true",
                   help="With --source auto: take the top of the ranking even when the gain "
                        "model expects no source to help (default: decline, exit code 3).")
    p.add_argument("--allow-leakage", action="store_true",
                   help="Run even when the source holds texts of the target (the gain is "
                        "then inflated); refused by default.")
    p.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    _add_output_args(p, json_help="Print the report as JSON.")
    p.set_defaults(func=cmd_transfer)

    from stepstone.finetune.kernel import FewShotFinetuneSettings
    from stepstone.selection.entk_solvers import KernelSettings

    p = sub.add_parser(
        "kernel", help="eNTK (kernel) prediction of few-shot fine-tuning, beside the real thing.")
    _add_target_arg(p)
    p.add_argument("--source", default=None,
                   help="Take the kernel of the encoder tuned on this source: an ESM id with a "
                        "kept model in --registry, or a built-in task id (fine-tuned here).")
    _add_registry_arg(p)
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
    _add_output_args(p)
    p.set_defaults(func=cmd_kernel)

    gain = sub.add_parser("gain", help="Fit and inspect the gain model behind the "
                                       "recommendation.")
    gsub = gain.add_subparsers(dest="gain_command", required=True)
    p = gsub.add_parser("fit", help="Fit a gain model on a transfer matrix (JSONL).")
    p.add_argument("--matrix", required=True,
                   help="Transfer-matrix results (benchmarks/transfer_matrix.py's JSONL).")
    p.add_argument("--registry", default=None,
                   help="Registry holding the matrix's source ESMs (default: shipped).")
    p.add_argument("--out", required=True, help="Where to write the model JSON.")
    p.add_argument("--scores", default=None,
                   help="Per-target scores JSON: read when it matches the matrix, else "
                        "computed and written there (refits then take seconds).")
    p.add_argument("--protocol", default=None, help="Protocol key, if the file has several.")
    p.add_argument("--tasks", default=None,
                   help="Use only the cells among these tasks (comma-separated specs, or "
                        "'all' = the benchmark pool); default: every row.")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1"])
    p.add_argument("--alpha", type=float, default=None, help="Ridge penalty (default 1).")
    p.add_argument("--level", type=float, default=None,
                   help="Nominal interval coverage (default 0.8).")
    _add_output_args(p, json_help="Print the model as JSON.")
    p.set_defaults(func=cmd_gain_fit)
    p = gsub.add_parser("show", help="Show a gain model (default: the shipped one).")
    p.add_argument("path", nargs="?", default=None)
    _add_output_args(p, json_help="Print the model as JSON.", quiet=False)
    p.set_defaults(func=cmd_gain_show)

    reg = sub.add_parser("registry", help="Build and inspect ESM registries.")
    rsub = reg.add_subparsers(dest="registry_command", required=True)

    def common(p, *, default_ok: bool = True):
        _add_registry_arg(p, default_ok=default_ok)
        _add_output_args(p, quiet=False)

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
    _add_filter_args(p)
    p.set_defaults(func=cmd_registry_list)
    p = rsub.add_parser("show", help="Show one ESM's row and config.")
    common(p)
    p.add_argument("id", help="An ESM id, or a task id that has one ESM in the registry.")
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
    p = rsub.add_parser(
        "import-hfselect", help="Import hf-dataset-selector ESMs: folders, Hub repo ids "
                                "(owner/name), or every ESM of a base model on the Hub. "
                                "Offline (HF_HUB_OFFLINE=1) repos come from the local Hub "
                                "cache only.")
    common(p, default_ok=False)
    p.add_argument("paths", nargs="*", help="ESM folders or Hub repo ids.")
    p.add_argument("--from-hub", action="store_true",
                   help="Discover the ESMs of --base-model by their Hub tags "
                        "(embedding_space_map, base_model:NAME), as hf-dataset-selector does; "
                        "offline, the ESM repos of that base model in the local Hub cache.")
    p.add_argument("--base-model", default=None,
                   help="Base model Hub id; imported repos must name it in their config.")
    p.add_argument("--hub-cache", default=None,
                   help="Hub cache folder (default: huggingface_hub's, HF_HUB_CACHE).")
    p.add_argument("--workers", type=int, default=8, help="Parallel downloads (default 8).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.add_argument("--encoder", default=None,
                   help="The encoder the ESM folders were trained on (package, folder, or a "
                        "known Hub id such as sentence-transformers/all-MiniLM-L6-v2); its "
                        "weights fingerprint is recorded. Default: the recorded Hub id, when "
                        "it names an installed encoder.")
    p.set_defaults(func=cmd_registry_import)
    p = rsub.add_parser(
        "export-hfselect", help="Write ESMs as hf-dataset-selector folders (config.json, "
                                "model.safetensors, a model card with its tags).")
    common(p)
    p.add_argument("ids", nargs="+", help="ESM ids.")
    p.add_argument("--out", required=True, help="Folder; each ESM goes to OUT/<id>/.")
    p.add_argument("--base-model", default=None,
                   help="Hub id to record as the base model (default: the Hub id known for "
                        "the ESM's encoder, e.g. sentence-transformers/all-MiniLM-L6-v2).")
    p.add_argument("--license", default=None, help="License for the model card (default: none).")
    p.add_argument("--push", default=None, metavar="REPO",
                   help="Also upload the (one) exported folder to this Hub repo.")
    p.set_defaults(func=cmd_registry_export)
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
