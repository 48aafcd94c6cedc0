"""Tiny seeded demo models, built offline with identical bytes on every build.

No weights can be downloaded where eDIF is developed and tested, so the demo profile and the
tests host two tiny causal LMs under Hub-style repo ids: `edif-demo/tiny-gpt2` (2 layers,
64 dims) and `edif-demo/tiny-llama` (2 layers, 64 dims, grouped-query attention). Each is a
transformers config, a byte-level BPE tokenizer trained by `tokenizers` on a fixed corpus and
weights from a fixed seed, written with `save_pretrained` to `$EDIF_HOME/models/<repo_id>/`.
Sites load them through the same code path as real Hub models (a local `source`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from edif.config import edif_home

TINY_GPT2 = "edif-demo/tiny-gpt2"
TINY_LLAMA = "edif-demo/tiny-llama"
VOCAB_SIZE = 400
_SEED = 20261126
_BUILD_VERSION = "1"  # bump when the recipe changes, so cached builds are rebuilt

_WORDS = (
    "the capital of france is paris and the capital of germany is berlin while rome is in "
    "italy madrid is in spain the eiffel tower stands in paris a cat sat on the mat the dog "
    "ran to the park researchers study how language models store facts inside their hidden "
    "states activation patching swaps a clean activation into a corrupt run the logit lens "
    "reads each layer through the unembedding europe hosts many universities ansbach "
    "erlangen heilbronn nuremberg munich one two three four five six seven eight nine ten"
).split()


def _corpus() -> list[str]:
    """A fixed corpus: every sentence is a deterministic permutation of the word list."""
    lines = []
    for i in range(200):
        step = 7 + (i % 11)
        words = [_WORDS[(i * 13 + j * step) % len(_WORDS)] for j in range(12)]
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _gpt2_tokenizer(tok):
    from transformers import GPT2TokenizerFast

    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # transformers 5 takes vocab=/merges=; the old *_file= names silently give an empty vocab.
    return GPT2TokenizerFast(vocab=model["vocab"], merges=merges)


def _build_gpt2(out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer(_train_tokenizer())
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(_SEED)
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _gpt2_tokenizer(_train_tokenizer())
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(_SEED + 1)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {TINY_GPT2: _build_gpt2, TINY_LLAMA: _build_llama}


def model_dir(repo_id: str, home: Path | None = None) -> Path:
    return (home or edif_home()) / "models" / repo_id


def ensure_model(repo_id: str, home: Path | None = None) -> Path:
    """Build `repo_id` under `$EDIF_HOME/models/` unless an up-to-date build is there.

    The build goes to a temporary sibling folder first and is renamed into place, so
    concurrent callers (several agents starting at once) never see a half-written model.
    """
    if repo_id not in BUILDERS:
        raise KeyError(f"{repo_id!r} is not a demo model; choose one of {sorted(BUILDERS)}")
    target = model_dir(repo_id, home)
    marker = target / ".edif-demo-build"
    if marker.exists() and marker.read_text() == _BUILD_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    BUILDERS[repo_id](staging)
    (staging / ".edif-demo-build").write_text(_BUILD_VERSION)
    try:
        os.rename(staging, target)
    except OSError:  # another process won the race, or a stale build is there
        if not (marker.exists() and marker.read_text() == _BUILD_VERSION):
            _replace_dir(staging, target)
        else:
            _remove_dir(staging)
    return target


def ensure_all(home: Path | None = None) -> dict[str, Path]:
    return {repo_id: ensure_model(repo_id, home) for repo_id in BUILDERS}


def fingerprint(path: Path) -> str:
    """SHA-256 over every file of a model folder (names and bytes), for reproducibility checks."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _remove_dir(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _replace_dir(staging: Path, target: Path) -> None:
    trash = target.with_name(f".{target.name}-old-{os.getpid()}")
    os.rename(target, trash)
    os.rename(staging, target)
    _remove_dir(trash)
