"""lm-evaluation-harness adapter: our `LanguageModel` registered as lm-eval model `llm_jax`.

Install with `pip install -e .[eval]` (pins lm-eval 0.4.13), then once per environment
`python -m llm.eval.lm_eval_hook` (tools/setup_env.sh does it): lm-eval 0.4.13 discovers models
only from its own MODEL_MAPPING, and that hook registers `llm_jax` whenever lm-eval's registry is
imported, so the plain command works:

    lm_eval --model llm_jax --model_args run_dir=runs/X \\
        --tasks my_task --include_path my_tasks/ --batch_size 7 --log_samples --output_path out/

Without the hook, `python -m llm.eval.harness` (console script `llm-lm-eval`) is the same command
line with the model registered; every lm_eval argument works. From Python:

    import llm.eval.harness  # registers llm_jax
    lm_eval.simple_evaluate(model="llm_jax", model_args="run_dir=runs/X", tasks=[...])

model_args: run_dir (required), step, max_length, micro_rows, truncate (default true: requests
longer than the context lose their oldest tokens, as lm-eval's HF model does). `--batch_size`
sets requests per call; results do not depend on it (see llm/eval/lm.py).
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from llm.eval.lm import LanguageModel


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class LLMJax(LM):
    """lm-eval's three request types answered by `llm.eval.lm.LanguageModel`."""

    def __init__(self, run_dir: str, step: int | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, device: str | None = None,
                 max_length: int | None = None, micro_rows: int = 4, truncate: bool = True,
                 **unused):
        super().__init__()
        del max_batch_size, device, unused  # JAX places the model; batch_size is per call
        batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.model = LanguageModel.from_run_dir(
            run_dir, step=None if step is None else int(step), batch_size=batch,
            max_length=None if max_length is None else int(max_length),
            micro_rows=int(micro_rows), truncate=_bool(truncate), progress=True)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [r.args for r in requests]
        out = self.model.loglikelihood([(c, x) for c, x in args])
        for a, o in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = self.model.loglikelihood_rolling(texts)
        for t, o in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), o)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [(r.args[0], dict(r.args[1] or {})) for r in requests]
        out = self.model.generate_until(args)
        for a, o in zip(args, out):
            self.cache_hook.add_partial("generate_until", a, o)
        return out

    def get_model_info(self) -> dict:
        run = self.model.run
        return {"model_run_dir": run.run_dir, "model_step": run.step,
                "model_num_parameters": run.cfg.num_params(),
                "model_max_length": self.model.max_length}


# A placeholder naming this module, as lm-eval registers its own models: the same entry whether
# this file runs as __main__ (`python -m llm.eval.harness`) or is imported, or the import hook
# (llm/eval/lm_eval_hook.py) registered it first; lm-eval imports the class when it is used.
if "llm_jax" not in model_registry:
    model_registry.register("llm_jax", target="llm.eval.harness:LLMJax")


def main() -> None:
    """The lm_eval command line with `llm_jax` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
