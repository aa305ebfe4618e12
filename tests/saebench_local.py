"""Offline stand-ins for what SAEBench and the Gemma benchmark download: a tiny language model
and the hub data sets they read.

* :func:`tiny_models` builds a 2-layer GPT-2 from a config with a word-level tokenizer trained
  here, as a Hugging Face model (wrapped in nnsight 0.3's ``LanguageModel`` for dictionary_learning's
  ``ActivationBuffer``) and as a TransformerLens ``HookedTransformer`` with the same weights (for
  SAEBench). Its token embeddings carry the first letter of each word in 26 dedicated dimensions,
  so the first-letter probes of SAEBench's absorption eval have something to find (a random model
  has no spelling knowledge, and the eval then reports no score); the other dimensions are random.
* :class:`LocalHub` serves, under the hub names SAEBench and the benchmark ask for, data sets built
  from real text shipped by the ``sae-probes`` package (AG News, news, Amazon reviews) and from
  labelled biographies generated here (``LabHC/bias_in_bios`` needs profession and gender labels,
  which no shipped data set has). ``LocalHub.load_dataset`` has ``datasets.load_dataset``'s
  signature and is what the tests pass as ``load_dataset=``.
"""

from __future__ import annotations

import functools
import random
import string
import tempfile
from pathlib import Path

import pandas as pd
import torch

PROBES_DATA = Path(__import__("sae_probes").__file__).parent / "data" / "cleaned_data"
MODEL_NAME = "tiny-gpt2"  # TransformerLens name; the HF/nnsight side is "local/tiny-gpt2"
HF_NAME = "local/tiny-gpt2"


# ----------------------------------------------------------------------------------------------
# Real text shipped by sae-probes
# ----------------------------------------------------------------------------------------------


def _csv(name: str) -> pd.DataFrame:
    return pd.read_csv(PROBES_DATA / name, compression="zstd")


@functools.lru_cache(maxsize=None)
def ag_news(max_chars: int = 600) -> pd.DataFrame:
    """AG News with its 4 labels, from sae-probes' three one-vs-rest files (``161..163_agnews_k``):
    label k for the positives of file k, 3 for the texts negative in all three."""
    frames = [_csv(f"{161 + i}_agnews_{i}.csv.zst") for i in range(3)]
    rows = []
    for i, df in enumerate(frames):
        rows += [(t, i) for t in df.prompt[df.target == 1]]
    negatives = set.intersection(*(set(df.prompt[df.target == 0]) for df in frames))
    rows += [(t, 3) for t in sorted(negatives)]
    out = pd.DataFrame(rows, columns=["text", "label"])
    out["text"] = out["text"].str.slice(0, max_chars)
    return out


@functools.lru_cache(maxsize=None)
def web_text(max_chars: int = 600) -> tuple[str, ...]:
    """Generic real text (news, fake-news detection, Amazon reviews) for training and core evals."""
    texts = list(ag_news(max_chars).text)
    for name in ("100_news_fake.csv.zst", "112_amzn_rev.csv.zst"):
        texts += [str(t)[:max_chars] for t in _csv(name).prompt]
    random.Random(0).shuffle(texts)
    return tuple(texts)


# ----------------------------------------------------------------------------------------------
# Generated biographies with profession and gender labels (LabHC/bias_in_bios's columns)
# ----------------------------------------------------------------------------------------------

# SAEBench's profession ids (sae_bench_utils.dataset_info.profession_dict) for the classes its
# configs use here: class set 1 (0, 1, 2, 6, 9) and the first SCR pair (professor 21 / nurse 13).
PROFESSIONS = {
    0: ("accountant", ["audits", "tax returns", "ledgers", "budgets", "invoices", "balance sheets"]),
    1: ("architect", ["buildings", "blueprints", "facades", "floor plans", "bridges", "museums"]),
    2: ("attorney", ["clients", "court cases", "contracts", "lawsuits", "trials", "appeals"]),
    6: ("dentist", ["teeth", "patients", "cavities", "crowns", "fillings", "gums"]),
    9: ("filmmaker", ["documentaries", "films", "festivals", "screenplays", "actors", "cameras"]),
    13: ("nurse", ["patients", "wards", "hospitals", "medication", "clinics", "care plans"]),
    21: ("professor", ["students", "lectures", "research", "seminars", "papers", "universities"]),
}
NAMES = {0: ["John", "David", "Michael", "James", "Robert", "Daniel", "Thomas", "Mark"],
         1: ["Mary", "Sarah", "Linda", "Emily", "Anna", "Laura", "Susan", "Karen"]}
PRONOUNS = {0: ("He", "his"), 1: ("She", "her")}
CITIES = ["Boston", "Denver", "Chicago", "Seattle", "Austin", "Portland", "Atlanta", "Miami"]
VERBS = ["works on", "specializes in", "writes about", "is known for", "focuses on", "manages"]


def make_bios(n_per_cell: int, seed: int) -> pd.DataFrame:
    """``n_per_cell`` biographies for every (profession, gender): columns hard_text, profession, gender."""
    rng = random.Random(seed)
    rows = []
    for prof, (title, objects) in PROFESSIONS.items():
        for gender in (0, 1):
            subj, poss = PRONOUNS[gender]
            for _ in range(n_per_cell):
                a, b = rng.sample(objects, 2)
                text = (f"{rng.choice(NAMES[gender])} is a {title} in {rng.choice(CITIES)} . {subj} "
                        f"{rng.choice(VERBS)} {a} and {b} . In {poss} free time {subj.lower()} enjoys "
                        f"{rng.choice(['hiking', 'reading', 'music', 'cooking', 'travel'])} .")
                rows.append((text, prof, gender))
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["hard_text", "profession", "gender"])


# ----------------------------------------------------------------------------------------------
# The local hub
# ----------------------------------------------------------------------------------------------


class LocalHub:
    """``load_dataset`` for the hub names used by SAEBench's evals and the benchmark, served locally.

    Unknown names raise ``FileNotFoundError`` (as ``datasets`` does offline), naming what is served.
    """

    TEXT = ("Skylion007/openwebtext", "monology/pile-uncopyrighted")

    def __init__(self, bios_per_cell: tuple[int, int] = (120, 50)):
        self.bios_per_cell = bios_per_cell
        self.calls: list[str] = []

    @functools.cached_property
    def _datasets(self):
        from datasets import Dataset, DatasetDict

        news = ag_news()
        test_mask = news.index % 5 == 0
        train, test = make_bios(self.bios_per_cell[0], 0), make_bios(self.bios_per_cell[1], 1)
        text = Dataset.from_dict({"text": list(web_text())})
        return {
            "LabHC/bias_in_bios": DatasetDict(train=Dataset.from_pandas(train), test=Dataset.from_pandas(test)),
            "fancyzhx/ag_news": DatasetDict(
                train=Dataset.from_pandas(news[~test_mask].reset_index(drop=True)),
                test=Dataset.from_pandas(news[test_mask].reset_index(drop=True)),
            ),
            **{name: DatasetDict(train=text) for name in self.TEXT},
        }

    def load_dataset(self, path, name=None, split=None, streaming=False, **kwargs):
        self.calls.append(path)
        if path not in self._datasets:
            raise FileNotFoundError(f"{path!r} is not available offline; served: {sorted(self._datasets)}")
        ds = self._datasets[path]
        if split is not None:
            ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        if streaming:
            from datasets import IterableDatasetDict

            return IterableDatasetDict({k: v.to_iterable_dataset() for k, v in ds.items()})
        return ds


# ----------------------------------------------------------------------------------------------
# The tiny model, twice: Hugging Face (+ nnsight) and TransformerLens
# ----------------------------------------------------------------------------------------------


class TinyModels:
    """The tiny GPT-2 as nnsight ``LanguageModel`` (training) and ``HookedTransformer`` (SAEBench)."""

    def __init__(self, hf_model, tokenizer, tl_model):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.tl_model = tl_model

    def language_model(self, cfg=None):
        from nnsight import LanguageModel

        return LanguageModel(self.hf_model, tokenizer=self.tokenizer)

    def hooked_transformer(self, cfg=None):
        return self.tl_model


# A few real words for every letter, so that every first letter has words in the vocabulary
# (SAEBench's absorption eval trains a k-sparse probe per letter and fails on a letter without words).
GLOSSARY = """
able acid aged also area army away baby back ball band bank base bath bear beat
calm camp card care case cash cast cell chip city dark data date dawn deal dear
each earn ease east easy edge else even ever evil face fact fade fail fair fall
gain game gate gave gear gift girl give glad goal half hall hand hang hard harm
idea inch into iron item ivory icon idle image issue jack jail jazz jean jest job
join joke jump jury just keen keep kept kick kind king kiss kite knee knew knot
lack lady laid lake lamp land lane last mail main make male mall many mark mass
name navy near neat neck need news next nice oath obey odds offer often oil okay
pace pack page paid pain pair palm park quack quad quaint quake qualm quart queen
quest quick quiet quilt quite quiz quota quote race rack rail rain rank rare rate
safe sage said sail sake sale salt same tail take tale talk tall tank tape task
ugly ultra umpire unable uncle under undo union unit unity until upon upper urban
vague vain valid value valve van vary vase vast veil vein verb verse very vest
wage wait wake walk wall want ward warm xenon xerox xylem xylophone xray xenial
yard yarn yawn year yell yellow yield yoga young your youth yacht yeast yesterday
zeal zebra zenith zero zest zigzag zinc zip zone zoo zoom zombie zodiac zany zeppelin
"""


def _train_tokenizer(texts, vocab_size: int):
    """A word-level tokenizer over the ``vocab_size`` most frequent words plus :data:`GLOSSARY`."""
    import collections

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]
    pre = pre_tokenizers.Whitespace()
    counts = collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
    words = list(dict.fromkeys([w for w, _ in counts.most_common(vocab_size)] + GLOSSARY.split()))
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    # TransformerLens re-loads tokenizers by name_or_path: give it a real folder.
    folder = tempfile.mkdtemp(prefix="tiny-tokenizer-")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder), folder


@functools.lru_cache(maxsize=None)
def tiny_models(d_model: int = 64, n_layers: int = 2, vocab_size: int = 400, seed: int = 0,
                first_letters: bool = True) -> TinyModels:
    """The tiny GPT-2 pair; ``first_letters=False`` gives plain random embeddings (no spelling knowledge)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    hub = LocalHub()
    bios = list(hub._datasets["LabHC/bias_in_bios"]["train"]["hard_text"])
    tokenizer, folder = _train_tokenizer(list(web_text()) + bios, vocab_size)
    n_vocab = len(tokenizer)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=n_vocab, n_positions=128, n_embd=d_model, n_layer=n_layers,
                                    n_head=4, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id)).eval()
    with torch.no_grad():
        emb = hf.transformer.wte.weight
        emb.normal_(0.0, 0.3)
        if first_letters:
            emb[:, :26] = 0.0
            for token, idx in tokenizer.get_vocab().items():
                if token[:1].lower() in string.ascii_lowercase:
                    emb[idx, string.ascii_lowercase.index(token[0].lower())] = 3.0
    tl_cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=d_model // 4, n_heads=4, d_mlp=4 * d_model, d_vocab=n_vocab,
        n_ctx=128, act_fn="gelu_new", normalization_type="LN", model_name=MODEL_NAME,
        original_architecture="GPT2LMHeadModel", tokenizer_name=folder, seed=seed,
    )
    tl = HookedTransformer(tl_cfg, tokenizer=tokenizer)
    tl.load_state_dict(convert_gpt2_weights(hf, tl_cfg), strict=False)
    tl.eval()
    return TinyModels(hf, tokenizer, tl)
