"""Human pairwise review of model outputs: export samples, rate them in a browser, report.

    # 1. the same prompts through two systems (run dirs, checkpoints or sampling settings)
    python -m tools.review export --prompts prompts.jsonl --out review/samples.jsonl \
        --system base=runs/quickstart@step=300 --system final=runs/quickstart \
        [--system hot=runs/quickstart@temperature=1.0,top_k=0,seed=1] [--max_new_tokens 96]
    # 2. a local web page (loopback only) rating A / B / tie / skip with the keyboard
    python -m tools.review serve --db review/ratings.sqlite --samples review/samples.jsonl
    # 3. Bradley-Terry strengths with bootstrap CIs, win-rate matrix: JSON + markdown + PNG
    python -m tools.review report --db review/ratings.sqlite --out review/report
    # 4. decisive ratings as chosen/rejected JSONL (reward-model / DPO training data)
    python -m tools.review pairs --db review/ratings.sqlite --out review/pairs.jsonl \
        [--aggregate majority --min_votes 2]      # then: experiments.reward / DPO train_pairs

A system is `NAME=RUN_DIR[@key=value,...]` with keys step (checkpoint; default the latest),
temperature (default 0.8), top_k (default 40; 0 = off) and seed (default 0). With more than two
systems every pair is compared on every prompt. Prompts: a JSONL file with a "prompt" field per
line, or a text file with one prompt per line ("\\n" in a line is a newline).

The page shows one item at a time: the prompt, then two answers in an order drawn per item and
reviewer (recorded with the rating). Keys: A or Left = the left answer is better, B or Right = the
right one, T or Down = tie, S = skip. Each rating is committed to SQLite as it is made, so the
server can be stopped and restarted at any time; a reviewer continues where they left off.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llm.data.sources import DataError
from llm.eval import review

DEFAULT_SAMPLING = {"step": None, "temperature": 0.8, "top_k": 40, "seed": 0}


# --------------------------------------------------------------------------------------- export


def parse_system(spec: str) -> dict:
    """`NAME=RUN_DIR[@key=value,...]` -> {"name", "run_dir", "step", "temperature", ...}."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise DataError(f"--system {spec!r} is not NAME=RUN_DIR[@key=value,...] (e.g. "
                        "--system base=runs/quickstart@temperature=0).")
    run_dir, _, opts = rest.partition("@")
    out = {"name": name, "run_dir": run_dir, **DEFAULT_SAMPLING}
    for opt in filter(None, opts.split(",")):
        key, sep, value = opt.partition("=")
        if not sep or key not in DEFAULT_SAMPLING:
            raise DataError(f"--system {spec!r}: unknown option {opt!r}; valid keys: "
                            f"{', '.join(DEFAULT_SAMPLING)}.")
        try:
            out[key] = float(value) if key == "temperature" else int(value)
        except ValueError:
            raise DataError(f"--system {spec!r}: {key}={value!r} is not a number.") from None
    return out


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"--prompts {path!r} does not exist.")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}).") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise DataError(f"{path}:{lineno} has no string field 'prompt'.")
                prompts.append(record["prompt"])
            else:
                prompts.append(line.rstrip("\n").replace("\\n", "\n"))
    if not prompts:
        raise DataError(f"--prompts {path!r} holds no prompts.")
    return prompts


def generate_outputs(system: dict, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One completion per prompt from `system` (llm.serve.sampler.generate, one ragged batch)."""
    from llm.runs import load_run
    from llm.serve.sampler import generate

    run = load_run(system["run_dir"], step=system["step"])
    ids = [run.tokenizer.encode(p) for p in prompts]
    for k, (p, t) in enumerate(zip(prompts, ids)):
        if not t:
            raise DataError(f"prompt {k} is empty after tokenization; remove it.")
        if len(t) + max_new_tokens > run.seq_len:
            raise DataError(f"prompt {k} ({p[:40]!r}...) is {len(t)} tokens; with "
                            f"--max_new_tokens {max_new_tokens} it exceeds the context of "
                            f"{system['run_dir']} ({run.seq_len} tokens). Shorten it or lower "
                            "--max_new_tokens.")
    new = generate(run.graphdef, run.params, run.cfg, ids, max_new_tokens=max_new_tokens,
                   temperature=system["temperature"], top_k=system["top_k"], seed=system["seed"])
    system["resolved_step"] = run.step
    return [run.tokenizer.decode(t) for t in new]


def export(systems: list[dict], prompts: list[str], out: str, max_new_tokens: int) -> int:
    """Writes one item per (prompt, pair of systems) to `out` (JSONL) plus `out`.meta.json."""
    names = [s["name"] for s in systems]
    if len(systems) < 2 or len(set(names)) != len(names):
        raise DataError(f"export needs >= 2 --system with distinct names (got {names}).")
    outputs = {}
    for s in systems:
        print(f"review export: generating {len(prompts)} outputs with {s['name']} "
              f"({s['run_dir']}, temperature {s['temperature']}, top_k {s['top_k']})")
        outputs[s["name"]] = generate_outputs(s, prompts, max_new_tokens)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    n = 0
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for k, prompt in enumerate(prompts):
            for a, b in review.pair_names(names):
                item = {"id": f"p{k:04d}:{a}-vs-{b}", "prompt": prompt, "system_a": a,
                        "output_a": outputs[a][k], "system_b": b, "output_b": outputs[b][k]}
                f.write(json.dumps(item) + "\n")
                n += 1
    os.replace(tmp, out)
    with open(out + ".meta.json", "w") as f:
        json.dump({"systems": systems, "num_prompts": len(prompts), "num_items": n,
                   "max_new_tokens": max_new_tokens}, f, indent=2)
    print(f"review export: wrote {n} items to {out}")
    return n


# ---------------------------------------------------------------------------------------- serve

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llm review</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }}
 pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .8em; border-radius: 6px;
       font-size: 13px; min-height: 3em; }}
 .answers {{ display: flex; gap: 1em; }} .answers > div {{ flex: 1; min-width: 0; }}
 .bar {{ display: flex; gap: .6em; margin: 1em 0; }}
 button {{ font-size: 15px; padding: .5em 1.2em; }} kbd {{ border: 1px solid #999;
       border-radius: 3px; padding: 0 .3em; background: #fff; }}
 .meta {{ color: #666; font-size: 13px; }}
</style></head><body>{body}</body></html>"""

LOGIN = """<h2>Pairwise review</h2><form method="get" action="/">
<label>Your name: <input id="reviewer" name="reviewer" autofocus required></label>
<button type="submit">Start</button></form>"""

DONE = """<h2>All {total} items rated. Thank you, {reviewer}.</h2>
<p class="meta">Ratings are stored in {db}. <a href="/">Switch reviewer</a></p>"""

ITEM = """<div class="meta">Reviewer <b id="who">{reviewer}</b> &middot; item
<span id="item-id">{item_id}</span> &middot; <span id="progress">{done} / {total}</span> rated
&middot; <a href="/">switch reviewer</a></div>
<h3>Prompt</h3><pre id="prompt">{prompt}</pre>
<div class="answers">
 <div><h3>A</h3><pre id="answer-a">{left}</pre></div>
 <div><h3>B</h3><pre id="answer-b">{right}</pre></div>
</div>
<form id="rate" method="post" action="/rate">
 <input type="hidden" name="item_id" value="{item_id}">
 <input type="hidden" name="reviewer" value="{reviewer}">
 <input type="hidden" name="left" value="{left_system}">
 <input type="hidden" name="shown" value="{shown}">
 <div class="bar">
  <button name="choice" value="A"><kbd>A</kbd> / &larr; A is better</button>
  <button name="choice" value="B"><kbd>B</kbd> / &rarr; B is better</button>
  <button name="choice" value="tie"><kbd>T</kbd> / &darr; tie</button>
  <button name="choice" value="skip"><kbd>S</kbd> skip</button>
 </div>
</form>
<script>
const keys = {{a: "A", arrowleft: "A", b: "B", arrowright: "B", t: "tie", arrowdown: "tie",
              s: "skip"}};
document.addEventListener("keydown", (e) => {{
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const choice = keys[e.key.toLowerCase()];
  if (!choice) return;
  e.preventDefault();
  const form = document.getElementById("rate");
  const input = document.createElement("input");
  input.type = "hidden"; input.name = "choice"; input.value = choice;
  form.appendChild(input);
  form.submit();
}});
</script>"""


def make_handler(db_path: str, seed: int):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # one quiet line per request on stderr
            sys.stderr.write(f"review serve: {self.command} {self.path} -> {args[1]}\n")

        def _send(self, status: int, body: str, headers: dict | None = None) -> None:
            data = PAGE.format(body=body).encode("utf-8") if body else b""
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            url = urllib.parse.urlparse(self.path)
            if url.path != "/":
                return self._send(404, "<h2>Not found</h2>")
            reviewer = urllib.parse.parse_qs(url.query).get("reviewer", [""])[0].strip()
            if not reviewer:
                return self._send(200, LOGIN)
            conn = review.connect(db_path)
            try:
                item = review.next_item(conn, reviewer)
                done, total = review.progress(conn, reviewer)
            finally:
                conn.close()
            e = html.escape
            if item is None:
                return self._send(200, DONE.format(total=total, reviewer=e(reviewer),
                                                   db=e(db_path)))
            a_left = review.left_is_a(item["id"], reviewer, seed)
            left, right = (("a", "b") if a_left else ("b", "a"))
            self._send(200, ITEM.format(
                reviewer=e(reviewer), item_id=e(item["id"]), done=done, total=total,
                prompt=e(item["prompt"]), left=e(item[f"output_{left}"]),
                right=e(item[f"output_{right}"]), left_system=e(item[f"system_{left}"]),
                shown=f"{time.time():.3f}"))

        def do_POST(self):  # noqa: N802
            if self.path != "/rate":
                return self._send(404, "<h2>Not found</h2>")
            length = int(self.headers.get("Content-Length", 0))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8"))
            get = lambda k: form.get(k, [""])[-1]  # the key handler's choice is the last one
            reviewer = get("reviewer").strip()
            try:
                shown = float(get("shown"))
            except ValueError:
                shown = None
            conn = review.connect(db_path)
            try:
                review.record(conn, get("item_id"), reviewer, get("left"), get("choice"),
                              seconds=None if shown is None else time.time() - shown)
            except ValueError as err:
                return self._send(400, f"<h2>Bad rating</h2><p>{html.escape(str(err))}</p>")
            finally:
                conn.close()
            query = urllib.parse.urlencode({"reviewer": reviewer})
            self._send(303, "", {"Location": f"/?{query}"})

    return Handler


def serve(db_path: str, samples: list[str], host: str, port: int, seed: int) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise DataError(f"--host {host!r}: the review page serves on loopback only "
                        "(127.0.0.1, localhost or ::1); use an SSH tunnel to reach it remotely.")
    conn = review.connect(db_path)
    try:
        for path in samples:
            new = review.add_items(conn, review.read_items(path), source=os.path.abspath(path))
            print(f"review serve: {new} new items from {path}")
        total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    finally:
        conn.close()
    if total == 0:
        raise DataError(f"{db_path} holds no items; pass --samples from `tools.review export`.")
    server = ThreadingHTTPServer((host, port), make_handler(db_path, seed))
    print(f"review serve: {total} items; open http://{host}:{server.server_address[1]}/ "
          "(Ctrl-C to stop; ratings are saved as they are made)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------------------ report / pairs


def write_report(db_path: str, out: str, bootstrap: int, prior: float, seed: int) -> dict:
    with review.opened(db_path) as conn:
        rep = review.report(conn, bootstrap=bootstrap, prior=prior, seed=seed)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "review.json"), "w") as f:
        json.dump(rep, f, indent=2)
    with open(os.path.join(out, "review.md"), "w") as f:
        f.write(review.markdown(rep))
    review.plot(rep, os.path.join(out, "review.png"))
    print(review.markdown(rep))
    print(f"review report: wrote {out}/review.json, review.md, review.png")
    return rep


def write_pairs(db_path: str, out: str, aggregate: str = "none", min_votes: int = 1) -> int:
    with review.opened(db_path) as conn:
        pairs = review.preference_pairs(conn, aggregate, min_votes)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    print(f"review pairs: wrote {len(pairs)} chosen/rejected pairs to {out}")
    return len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.review",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="generate pairwise samples")
    p.add_argument("--system", action="append", required=True,
                   help="NAME=RUN_DIR[@step=N,temperature=T,top_k=K,seed=S] (>= 2)")
    p.add_argument("--prompts", required=True, help="JSONL with 'prompt' or text, one per line")
    p.add_argument("--out", required=True, help="samples JSONL to write")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p = sub.add_parser("serve", help="rate samples in a local web page")
    p.add_argument("--db", required=True, help="SQLite database (created if missing)")
    p.add_argument("--samples", action="append", default=[], help="samples JSONL to load")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 = any free port")
    p.add_argument("--seed", type=int, default=0, help="seed of the left/right order")
    p = sub.add_parser("report", help="Bradley-Terry report: JSON + markdown + PNG")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--prior", type=float, default=0.1,
                   help="virtual comparisons per pair of systems (keeps the MLE finite)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("pairs", help="decisive ratings as chosen/rejected JSONL (reward model, "
                       "DPO)")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--aggregate", choices=review.AGGREGATES, default="none",
                   help="none: a pair per rating; majority: a pair per item by majority vote")
    p.add_argument("--min_votes", type=int, default=1,
                   help="with --aggregate majority: decisive votes an item needs")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            if args.max_new_tokens < 1:
                raise DataError(f"--max_new_tokens {args.max_new_tokens} must be >= 1.")
            export([parse_system(s) for s in args.system], read_prompts(args.prompts), args.out,
                   args.max_new_tokens)
        elif args.command == "serve":
            serve(args.db, args.samples, args.host, args.port, args.seed)
        elif args.command == "report":
            if args.bootstrap < 1 or args.prior < 0:
                raise DataError("--bootstrap must be >= 1 and --prior >= 0.")
            write_report(args.db, args.out, args.bootstrap, args.prior, args.seed)
        else:
            if args.min_votes < 1:
                raise DataError(f"--min_votes {args.min_votes} must be >= 1.")
            write_pairs(args.db, args.out, args.aggregate, args.min_votes)
    except (DataError, ValueError) as e:
        print(f"review {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"review {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
