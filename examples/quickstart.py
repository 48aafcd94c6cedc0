"""A researcher's script against eDIF: logit lens and activation patching, remote=True.

Only three things differ from local nnsight code: the broker's address, the API key (a JWT
issued by eDIF) and `remote=True`. Run it against a mesh with:

    NDIF_HOST=http://127.0.0.1:PORT NDIF_API_KEY=$(edif token issue --sub you --role researcher) \
        python examples/quickstart.py

`edif.demo.load` builds the demo model locally (no Hub access here) and seeds nnsight's
Hub-id cache; with a real Hub model you would write `TransformersModel("openai-community/gpt2")`.
"""

from __future__ import annotations

import os

import nnsight
import torch

from edif.demo import TINY_GPT2, load

nnsight.CONFIG.API.HOST = os.environ["NDIF_HOST"]  # 1. the broker
nnsight.CONFIG.API.APIKEY = os.environ["NDIF_API_KEY"]  # 2. your eDIF token
model = load(TINY_GPT2)  # meta model: no weights on this machine

PROMPT = "The capital of France is"

# Logit lens: read every layer's last-token state through the final norm and unembedding.
with model.trace(PROMPT, remote=True):  # 3. remote=True
    tops = []
    for layer in model.transformer.h:
        state = model.transformer.ln_f(layer.output[:, -1, :])
        tops.append(model.lm_head(state).argmax(dim=-1))
    lens = torch.stack(tops).save()  # [layers, 1]
    logits = model.lm_head.output[:, -1, :].save()

print("logit lens, top token per layer:")
for i, top in enumerate(lens):
    print(f"  layer {i}: {model.tokenizer.decode(top)!r}")
assert lens.shape == (len(model.transformer.h), 1)
print("final prediction:", repr(model.tokenizer.decode(logits.argmax(dim=-1))))

# Activation patching: carry the last-token state of a clean run into a corrupt run.
CLEAN, CORRUPT = "The Eiffel Tower stands in paris", "The cat sat on the mat"
with model.trace(remote=True) as tracer:
    barrier = tracer.barrier(2)
    with tracer.invoke(CLEAN):
        clean = model.transformer.h[1].output[:, -1, :]
        barrier()
    with tracer.invoke(CORRUPT):
        barrier()
        model.transformer.h[1].output[:, -1, :] = clean
        patched = model.lm_head.output[:, -1, :].save()
with model.trace(CORRUPT, remote=True):
    corrupt = model.lm_head.output[:, -1, :].save()

shift = (patched[-1] - corrupt[-1]).abs().max().item()
print(f"activation patching: max logit change at the last token = {shift:.4f}")
print("patched top token:", repr(model.tokenizer.decode(patched[-1].argmax())))
assert torch.isfinite(patched).all()
