"""The `ratlm` model of lm-evaluation-harness (`pip install 'ratlm[eval]'`).

    lm_eval.simple_evaluate(model="ratlm", model_args="pretrained=DIR,tokenizer=PATH", tasks=[...])
    ratlm eval harness --model ratlm --model_args pretrained=DIR --tasks hellaswag

Importing this module registers the name "ratlm" (the package also declares it as an `lm_eval.models`
entry point, which lm-eval versions with plugin discovery pick up by themselves). model_args:
pretrained (model directory), tokenizer (default: the one saved with the model), device, dtype
(fp32, bf16, fp16), batch_size, max_length (default: the training context), max_gen_toks, seed.

Texts are encoded without BOS; EOS stands before an empty context and before the first token of a
rolling-loglikelihood document, as lm-eval does for every model.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..generation import generate
from .inputs import load_model, model_tokenizer

FIRST_ROUND = 32  # tokens generated before stop strings are first looked for; doubled each round


@register_model("ratlm")
class RatLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            warnings.warn(f"ratlm model: ignoring model_args {sorted(unused)}", stacklevel=2)
        self.pretrained = pretrained
        self.model = load_model(pretrained, device=device, dtype=dtype)
        self._device = next(self.model.parameters()).device
        self.tok = model_tokenizer(pretrained, tokenizer)
        if self.tok is None or self.tok.eos_id is None:
            raise ValueError(
                f"{pretrained}: give a tokenizer (model_args tokenizer=PATH) that has an EOS token"
            )
        vocab = self.model.config.vocab_size
        if self.tok.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {self.tok.vocab_size} tokens, the model only {vocab}")
        self.max_length = int(max_length or self.model.config.context)
        # lm-eval's "auto" / "auto:N" batch sizes search for the largest batch that fits; not offered here.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def get_model_info(self) -> dict:
        return {"model_dir": str(self.pretrained), "model_num_parameters": self.model.num_params()}

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) for requests
        ((context text, continuation text), context ids, continuation ids); rolling windows pass no texts."""
        results: list = [None] * len(requests)
        # Longest first, so a batch pads little (padding goes at the end: a causal model never sees it).
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="loglikelihood", disable=disable_tqdm):
            pieces = [self._window(requests[i][1], requests[i][2]) for i in batch]
            width = max(len(inputs) for inputs, _ in pieces)
            rows = [inputs + [self.eot_token_id] * (width - len(inputs)) for inputs, _ in pieces]
            logits = self.model(torch.tensor(rows, device=self.device))
            for row, (i, (inputs, targets)) in enumerate(zip(batch, pieces, strict=True)):
                logprobs = logits[row, len(inputs) - len(targets) : len(inputs)].float().log_softmax(-1)
                target = torch.tensor(targets, device=self.device, dtype=torch.long)
                score = float(logprobs.gather(-1, target[:, None]).sum())
                results[i] = (score, bool((logprobs.argmax(-1) == target).all()))
                if requests[i][0][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Model inputs (the last max_length tokens) and the continuation tokens they score."""
        whole = (context + continuation)[-(self.max_length + 1) :]
        n = min(len(continuation), len(whole) - 1)
        return whole[:-1], whole[len(whole) - n :]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of max_length tokens that each score new tokens."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append(((None, None), context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, scores, strict=True):
            totals[index] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations that stop before the first stop string (`until`), at EOS, or at max_gen_toks."""
        groups = defaultdict(list)  # requests with the same generation settings share batches
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((index, context))
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, items in groups.items():
            settings = _generation_settings(json.loads(key), self.max_gen_toks)
            items.sort(key=lambda item: -len(item[1]))
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                texts = self._generate([context for _, context in batch], **settings)
                for (index, context), text in zip(batch, texts, strict=True):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", (context, requests[index].args[1]), text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, contexts: list[str], until: list[str], max_new: int, **sampling) -> list[str]:
        """Generate in rounds of growing length, looking for stop strings between rounds, so that a
        batch stops soon after its last sequence does. Each round continues prompt + text so far."""
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks ({max_new}) must be below max_length ({self.max_length})")
        room = self.max_length - max_new
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-room:] for c in contexts]
        outputs: list[list[int]] = [[] for _ in contexts]
        texts: list = [None] * len(contexts)
        active, step, round_ = list(range(len(contexts))), FIRST_ROUND, 0
        while active:
            n_new = min(step, max_new - len(outputs[active[0]]))
            new = generate(
                self.model,
                [prompts[i] + outputs[i] for i in active],
                n_new,
                stop_ids=(self.eot_token_id,),
                seed=self.seed + round_,
                **sampling,
            )
            still = []
            for i, tokens in zip(active, new, strict=True):
                outputs[i] += tokens
                text = self.tok.decode(outputs[i])
                cut = min((p for p in (text.find(s) for s in until) if p >= 0), default=-1)
                if cut >= 0:
                    texts[i] = text[:cut]
                elif (tokens and tokens[-1] == self.eot_token_id) or len(outputs[i]) >= max_new:
                    texts[i] = text
                else:
                    still.append(i)
            active, step, round_ = still, 2 * step, round_ + 1
        return texts


def _generation_settings(gen_kwargs: dict, default_max: int) -> dict:
    """lm-eval's generation kwargs as arguments of `_generate`: greedy unless do_sample (or a positive
    temperature without do_sample) asks for sampling."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = next(
        (gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if gen_kwargs.get(k)),
        default_max,
    )
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = gen_kwargs.get("do_sample", temperature > 0)
    return {
        "until": [s for s in until if s],
        "max_new": int(max_new),
        "temperature": temperature if do_sample and temperature > 0 else (1.0 if do_sample else 0.0),
        "top_k": gen_kwargs.get("top_k") or None,
        "top_p": gen_kwargs.get("top_p") or None,
    }
