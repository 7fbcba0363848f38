"""The `specialize` command: one subcommand per stage; parsing only, each calls the stage's function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import get_args

from specialize import __version__
from specialize.config import ConfigError, DType, Engine, ModelConfig, TemplateName, load_config
from specialize.train.config import PRESETS

STAGES = """\
stages:
  data      inspect instruction datasets (counts, fields, token lengths, rendered prompts)
  generate  complete an instruction with a model
  train     instruction-tune a model: data mix -> stages (generalist, specialist) -> adapter or weights
  eval      evaluate a base model and adapters on YAML-declared tasks (generation, options, k-shot, CIs)
  synth     self-specialization: seeds -> generated instructions -> retrieval-grounded responses -> adapter
  run       an experiment: grid of (generalist x task amount x model x seed) -> train -> eval, cached
  report    tables, curves and findings of an experiment as PNG + self-contained HTML
  quickstart the whole method in miniature on the embedded model and shipped data (a few minutes on CPU)
  serve     OpenAI-compatible server: one base model, many LoRA specialists in mixed batches
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    # no defaults here: a flag overrides the config file only when it is given (the configs hold the defaults)
    p.add_argument("--model", default=None, help="embedded | path.gguf | local dir | hub id (default: embedded)")
    p.add_argument("--dtype", default=None, choices=get_args(DType), help="default: auto")
    p.add_argument("--device", default=None, help="default: cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code from the hub (off by default)")
    p.add_argument("--engine", default=None, choices=get_args(Engine),
                   help="what generates text: hf (default: the project's token loop) or vllm (make vllm)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="hf engine: a lone request decodes through torch.compile (~1 min to compile)")  # fmt: skip
    p.add_argument("--template", default=None, choices=get_args(TemplateName),
                   help="prompt template (default: the one stored with the adapter/model, else alpaca)")  # fmt: skip
    p.add_argument("--system", default=None, help="system message for the chat template")


def _model_flags(args: argparse.Namespace, *, template: bool = True) -> list[str]:
    """The model flags the user gave (and `--template`), as config overrides."""
    flags = _value_flags(**{"model.spec": args.model, "model.dtype": args.dtype, "model.device": args.device,
                            "model.threads": args.threads, "model.engine": args.engine})  # fmt: skip
    if args.trust_remote_code:
        flags.append("model.trust_remote_code=true")
    if args.compile:
        flags.append("model.compile=true")
    return flags + (_value_flags(template=args.template) if template else [])


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return load_config(ModelConfig, None, [f.removeprefix("model.") for f in _model_flags(args, template=False)])


def _value_flags(**values: object) -> list[str]:
    """`key=value` overrides for the options the user gave (None = not given)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def _parse_mapping(items: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep:
            raise SystemExit(f"--map {item!r}: expected FIELD=COLUMN (e.g. output=answer, or input= for none)")
        out[field] = column or None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specialize",
        description="Carve a specialist LLM out of a generalist one.",
        epilog=STAGES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"specialize {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")

    data = sub.add_parser("data", help="inspect instruction datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = data_sub.add_parser("fetch", help="download a public dataset from the Hugging Face hub as JSONL")
    fetch.add_argument("name", help="alpaca-gpt4 | alpaca | dolly | superni")
    fetch.add_argument("--out", default="data", help="output directory (writes NAME.jsonl)")
    fetch.add_argument("--from", dest="local", default=None, help="a `datasets.save_to_disk` copy instead of the hub")
    fetch.add_argument("--limit", type=int, default=None)
    inspect = data_sub.add_parser("inspect", help="counts, fields, token-length percentiles, rendered prompts")
    inspect.add_argument("path", help="file or dataset directory")
    inspect.add_argument("--format", default=None, help="force a reader (default: detect)")
    inspect.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN", help="field mapping")
    inspect.add_argument("--skip-invalid", action="store_true", help="skip bad records (counted and listed)")
    inspect.add_argument("--limit", type=int, default=None, help="read at most N records")
    inspect.add_argument("--show", type=int, default=2, help="rendered prompts to print")
    inspect.add_argument("--json", action="store_true", help="print the statistics as JSON")
    _add_model_args(inspect)

    train = sub.add_parser("train", help="instruction-tune a model (resumable; runs under accelerate/torchrun)")
    train.add_argument("config", help="YAML file, or a preset: " + ", ".join(PRESETS))
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    ev = sub.add_parser("eval", help="evaluate base model and adapters on tasks")
    ev.add_argument("config", nargs="?", help="eval YAML (optional when --task is given)")
    ev.add_argument("--task", action="append", default=[], help="catalogue name or task YAML (repeatable)")
    ev.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="PEFT adapter to evaluate")
    ev.add_argument("--no-base", action="store_true", help="skip the base model")
    ev.add_argument("--shots", default=None, help="comma-separated k values, e.g. 0,1,5")
    ev.add_argument("--limit", type=int, default=None, help="examples per task")
    ev.add_argument("--out", default=None, help="output directory (default results/eval)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ev.add_argument("--list-tasks", action="store_true", help="list the task catalogue and exit")
    _add_model_args(ev)

    syn = sub.add_parser("synth", help="self-specialization data (and adapter) from seeds and a domain corpus")
    syn.add_argument("config", nargs="?", help="synth YAML (flags below override it)")
    syn.add_argument("--domain", default=None, help="e.g. biomedical, financial")
    syn.add_argument("--seeds", default=None, help="seed examples (any reader format; BoX JSON, seed_tasks.jsonl ...)")
    syn.add_argument("--corpus", default=None, help="unlabeled domain corpus JSONL {id, text}")
    syn.add_argument("--num", type=int, default=None, help="instructions to keep after filtering")
    syn.add_argument("--retrieval", choices=["marginalize", "top1", "none"], default=None)
    syn.add_argument("--top-k", type=int, default=None)
    syn.add_argument("--adapter", default=None, help="generate with this specialized adapter (iteration 2)")
    syn.add_argument("--contrastive", action="store_true", help="contrastive decoding against the base (eq. 3)")
    syn.add_argument("--iteration", type=int, default=None)
    syn.add_argument("--out", default=None, help="output directory")
    syn.add_argument("--train", action="store_true", help="then tune a LoRA specialist on the data")
    syn.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                     help="override the self_specialization_lora training preset")  # fmt: skip
    syn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    _add_model_args(syn)

    run = sub.add_parser("run", help="run (or resume, or extend) an experiment; only new work is computed")
    run.add_argument("config", help="experiment YAML")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--scale", type=float, default=None, help="multiply the specialist amounts (paper scale on a GPU)")
    run.add_argument("--dry-run", action="store_true", help="print the plan (cached vs new stages, cost) and exit")
    run.add_argument("--tok-per-s", type=float, default=250.0, help="training throughput assumed by --dry-run")
    run.add_argument("--no-report", action="store_true", help="skip writing the report at the end")

    rep = sub.add_parser("report", help="render an experiment's tables, curves and findings (HTML + PNG)")
    rep.add_argument("run_dir", nargs="+", help="the experiment's output_dir (several: one table across them)")
    rep.add_argument("--out", help="with several experiments: where the combined report goes")

    qs = sub.add_parser("quickstart", help="the whole method in miniature (embedded model, shipped data)")
    qs.add_argument("--out", default="runs/quickstart")
    qs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    srv = sub.add_parser("serve", help="OpenAI-compatible API over the base model and its adapters")
    srv.add_argument("config", nargs="?", help="serve YAML (flags below override it)")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="LoRA adapter to serve")
    srv.add_argument("--host", default=None, help="default 127.0.0.1; other hosts need a token")
    srv.add_argument("--port", type=int, default=None, help="default 8000")
    srv.add_argument("--token", default=None, help="bearer token (default: $SPECIALIZE_API_TOKEN)")
    srv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    _add_model_args(srv)

    gen = sub.add_parser("generate", help="complete an instruction")
    gen.add_argument("instruction")
    gen.add_argument("--input", default="", help="optional input for the instruction")
    gen.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter (its stored template is used)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    _add_model_args(gen)
    return parser


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from specialize.data.fetch import HUB, fetch

    if args.name not in HUB:
        raise SystemExit(f"unknown dataset {args.name!r}; known: {', '.join(sorted(HUB))}")
    out, result = fetch(args.name, args.out, local=args.local, limit=args.limit)
    print(f"{out}: {len(result.records)} records ({HUB[args.name].license}); skipped {len(result.skipped)}")
    for s in result.skipped[:5]:
        print(f"  skipped: {s}")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from specialize.data import read_records
    from specialize.data.stats import dataset_stats, print_stats
    from specialize.models import load_tokenizer
    from specialize.prompts import get_template

    result = read_records(
        args.path, args.format, mapping=_parse_mapping(args.map) or None,
        skip_invalid=args.skip_invalid, limit=args.limit,
    )  # fmt: skip
    model = _model_config(args)
    tokenizer = load_tokenizer(model.spec, trust_remote_code=model.trust_remote_code)
    template = get_template(args.template or "alpaca", tokenizer, args.system)
    stats = dataset_stats(result.records, tokenizer, template)
    stats["skipped"] = len(result.skipped)
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    print_stats(args.path, stats, result, template, f"{model.spec}, {template.name} template", args.show)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from specialize.generation import SamplingParams, prompt_requests
    from specialize.generation.engines import engine_for
    from specialize.models import check_adapter, load_runtime

    try:  # every flag is checked before the model loads
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
    except ValidationError as e:
        msgs = "; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"specialize generate: {msgs}") from None
    name = "adapter"
    if args.adapter:
        check_adapter(name, args.adapter)
    cfg = _model_config(args)
    rt = load_runtime(cfg, template=args.template, adapters={name: args.adapter} if args.adapter else None)
    template = rt.prompt_template(name if args.adapter else "base", args.system)
    prompt = template.render(args.instruction, args.input)
    [completion] = engine_for(rt, cfg).run(prompt_requests(rt.tokenizer, [prompt], template, params))
    print(completion.text.strip())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from specialize.train import load_train_config, run_training

    cfg = load_train_config(args.config, args.set)
    if args.print_config:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    results = run_training(cfg)
    if os.environ.get("RANK", "0") == "0":  # one report per distributed run
        for r in results:
            state = "reused" if r.reused else f"{r.steps} steps, final loss {r.final_loss:.4f}"
            print(f"{r.name}: {r.output} ({state})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torch 2.13 keeps the gloo group (its worker and socket threads) alive after destroy_process_group once DDP
        # has built a Reducer, so interpreter finalization tears it down among static destructors: one rank aborted
        # there in CI ("terminate called without an active exception"). Every artifact is written atomically by now;
        # leave without finalization, as multiprocessing's worker processes do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from specialize.eval.harness import EvalConfig, evaluate, print_summary
    from specialize.eval.tasks import catalogue

    if args.list_tasks:
        for name, path in sorted(catalogue().items()):
            print(f"{name:20s} {path.read_text().splitlines()[0].lstrip('# ')}")
        return 0
    flags: list[str] = []
    if args.task:
        flags.append(f"tasks={json.dumps(args.task)}")
    adapters = dict(_split_pair(a) for a in args.adapter)
    if adapters:
        flags.append(f"adapters={json.dumps(adapters)}")
    if args.no_base:
        flags.append("include_base=false")
    if args.shots:
        flags.append(f"shots=[{args.shots}]")
    flags += _value_flags(limit=args.limit, output_dir=args.out)
    if args.config is None and not args.task:
        raise ConfigError("give an eval config file or at least one --task")
    # the flags the user gave win over the file; --set wins over both
    cfg = load_config(EvalConfig, args.config, _model_flags(args) + flags + args.set)
    summary = evaluate(cfg)
    print_summary(summary)
    print(f"results: {cfg.output_dir}/summary.json, predictions.jsonl, manifest.json")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from specialize.synth.pipeline import SynthConfig, run_synth

    flags = _model_flags(args, template=False)  # synth renders its own prompts
    flags += _value_flags(domain=args.domain, seeds=args.seeds, corpus=args.corpus, num=args.num,
                          retrieval=args.retrieval, top_k=args.top_k, adapter=args.adapter, iteration=args.iteration,
                          output_dir=args.out)  # fmt: skip
    if args.contrastive:
        flags.append("contrastive=true")
    cfg = load_config(SynthConfig, args.config, flags + args.set)
    data = run_synth(cfg)
    print(f"data: {data} (stats: {data.parent / 'stats.json'}, {data.parent / 'stats.png'})")
    if args.train:
        from specialize.train import run_training
        from specialize.train.config import self_specialization_config

        train_cfg = self_specialization_config(
            data, model=cfg.model, output_dir=data.parent / "specialist", overrides=args.train_set
        )
        [result] = run_training(train_cfg)
        print(f"adapter: {result.output}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from specialize.experiment.config import load_experiment
    from specialize.experiment.report import render
    from specialize.experiment.runner import plan, print_plan, run_experiment

    overrides = list(args.set) + ([f"scale={args.scale}"] if args.scale else [])
    cfg = load_experiment(args.config, overrides)
    if args.dry_run:
        print_plan(cfg, plan(cfg), args.tok_per_s)
        return 0
    store = run_experiment(cfg)
    print(f"results: {store}")
    if not args.no_report:
        print(f"report: {render(store.parent)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from specialize.experiment.report import combine, render

    if len(args.run_dir) == 1 and not args.out:
        print(f"report: {render(args.run_dir[0])}")
    elif not args.out:
        raise ConfigError("specialize report: several experiments need --out DIR for the combined report")
    else:
        print(f"report: {combine(args.run_dir, args.out)}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from specialize.experiment.quickstart import quickstart

    quickstart(args.out, args.set)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from specialize.serve.server import ServeConfig, serve

    flags = _model_flags(args)
    flags += _value_flags(host=args.host, port=args.port, token=args.token)
    flags += [f"adapters.{name}={json.dumps(path)}" for name, path in map(_split_pair, args.adapter)]
    serve(load_config(ServeConfig, args.config, flags + args.set))
    return 0


def _split_pair(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{item!r}: expected NAME=DIR")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    from specialize.data import DataError
    from specialize.models import ModelLoadError
    from specialize.train.sft import TrainConfigError

    # a deprecation raised inside PEFT's own call into transformers: the user cannot act on it
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        ("data", "inspect"): _cmd_data_inspect,
        ("data", "fetch"): _cmd_data_fetch,
        ("generate", None): _cmd_generate,
        ("train", None): _cmd_train,
        ("eval", None): _cmd_eval,
        ("synth", None): _cmd_synth,
        ("serve", None): _cmd_serve,
        ("run", None): _cmd_run,
        ("report", None): _cmd_report,
        ("quickstart", None): _cmd_quickstart,
    }
    handler = handlers.get((args.command, getattr(args, "data_command", None)))
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (DataError, ConfigError, ModelLoadError, TrainConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
