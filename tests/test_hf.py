"""Causal LMs from HuggingFace: per-token gradients, padding, loading by path, presets, errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import l3d
from l3d import L3DError, hf, run, runs
from l3d.core.divergences import kl
from l3d.core.gradients import per_sample_gradients
from l3d.core.model import Target, select_parameters

WORDS = [
    "<pad>", "<eos>", "once", "upon", "a", "time", "there", "was", "cat", "dog", "big", "small",
    "ran", "sat", "the",
]  # fmt: skip
BLOCK = [
    "transformer.h.1.attn.attention.*_proj.weight",
    "transformer.h.1.attn.attention.out_proj.bias",
]


def tiny_config(vocab: int = len(WORDS)):
    return hf.tinystories_8m_config(
        vocab_size=vocab,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=1,
    )


def save_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    ).save_pretrained(str(path))


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt-neo")
    model = hf.random_causal_lm(tiny_config(), path, seed=0)
    save_tokenizer(path)
    return path, model


def test_load_by_path_round_trip(saved_lm):
    path, model = saved_lm
    loaded = hf.load_causal_lm(path)
    assert not loaded.training
    assert loaded.config._attn_implementation == "eager"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[2, 3, 4, 5]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits)


def test_token_dataset_pads_right_and_masks(saved_lm):
    path, _ = saved_lm
    tok = hf.load_tokenizer(path)
    data = hf.token_dataset(["once upon a time there", "the cat sat", "dog"], tok, seq_len=4)
    # 'dog' has one token (< min_tokens) and is skipped; the first is truncated to seq_len.
    assert data["input_ids"].tolist() == [[2, 3, 4, 5], [14, 8, 13, tok.pad_token_id]]
    assert data["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    chunked = hf.token_dataset([[1, 2, 3, 4, 5, 6, 7]], seq_len=3, chunk=True)
    assert chunked["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]  # the lone '7' is too short


def test_token_dataset_from_file(tmp_path, saved_lm):
    path, _ = saved_lm
    text = tmp_path / "stories.txt"
    text.write_text("once upon a time<|endoftext|>the big dog ran<|endoftext|>\n")
    data = hf.token_dataset(text, hf.load_tokenizer(path), seq_len=8, separator="<|endoftext|>")
    assert data["attention_mask"].sum(1).tolist() == [4, 4]


def test_per_token_gradients_equal_a_loop_of_backward_calls(saved_lm):
    _, model = saved_lm
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(WORDS), (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    target = Target.create(model, BLOCK)
    refs = torch.randn(3, 5, len(WORDS), generator=g)
    grads = per_sample_gradients(target, inputs, refs, kl, per_token=True)
    params = dict(model.named_parameters())
    row = 0
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                continue
            model.zero_grad()
            logits = model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
            kl(logits[0, t], refs[b, t]).backward()
            for name in target.names:
                assert torch.allclose(grads[name][row], params[name].grad, atol=1e-6), (name, b, t)
            row += 1
    assert row == int(mask.sum()) == next(iter(grads.values())).shape[0]


def test_padding_is_never_a_sample(saved_lm):
    _, model = saved_lm
    preset = hf.get_preset("tinystories-8m")
    config = preset.config(
        params=BLOCK, n_subnetworks=3, rank=2, epochs=1, batch_size=4, warm_start_epochs=0
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, len(WORDS), (6, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    decomposition = run(model, data, config, progress=False)
    assert decomposition.evaluation.n_samples == int(mask.sum())
    coeffs = decomposition.coefficients(data, seed=3)
    assert coeffs.shape == (int(mask.sum()), 3)
    # Whatever sits in padded positions cannot change any coefficient: it is neither a sample nor a
    # reference, and (right padding, causal attention) never feeds a valid position.
    other = {"input_ids": ids.masked_fill(mask == 0, 7), "attention_mask": mask}
    assert torch.allclose(decomposition.coefficients(other, seed=3), coeffs, atol=1e-6)


def test_prepare_builds_model_data_and_config(saved_lm, tmp_path):
    path, _ = saved_lm
    text = tmp_path / "t.txt"
    text.write_text("once upon a time there was\nthe cat sat\nthe big dog ran\n")
    setup = hf.prepare(path, text, params=BLOCK, n_subnetworks=2, rank=1)
    assert setup.config.per_token and setup.config.divergence == "kl"
    assert setup.data["input_ids"].shape == (3, 16)
    assert setup.config.n_subnetworks == 2


def test_paper_preset_matches_the_authors_run():
    preset = hf.get_preset("tinystories-8m")
    config = preset.config()
    assert (config.n_subnetworks, config.rank, config.top_k, config.batch_size) == (
        100,
        25,
        0.1,
        16,
    )
    assert preset.seq_len == 16 and config.per_token


def test_paper_preset_selects_262400_parameters_of_block_h4():
    from transformers import GPTNeoForCausalLM

    with torch.device("meta"):
        model = GPTNeoForCausalLM(hf.tinystories_8m_config())
    target_names = [
        n for n, _ in model.named_parameters() if n.startswith("transformer.h.4.attn.attention.")
    ]
    names = select_parameters(model, hf.get_preset("tinystories-8m").config().params)
    assert names == target_names
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in names) == 262_400


def test_clear_errors(saved_lm, tmp_path):
    path, model = saved_lm
    with pytest.raises(
        L3DError, match=r"matches no parameter.*Close matches: transformer\.h\.1\.attn"
    ):
        Target.create(model, ["transformer.h.1.attn.atention.q_proj.weight"])
    small = hf.random_causal_lm(tiny_config(vocab=5))
    with pytest.raises(L3DError, match="tokenizer has 15 tokens but the model only 5"):
        hf.check_vocabulary(hf.load_tokenizer(path), small)
    with pytest.raises(L3DError, match="outside the model's vocabulary of 5"):
        hf.token_dataset([[1, 2, 9], [3, 4]], vocab_size=5)
    with pytest.raises(L3DError, match="cannot load a causal LM"):
        hf.load_causal_lm(tmp_path / "missing")
    with pytest.raises(L3DError, match="(?i)did you mean tinystories-8m"):
        hf.get_preset("tinystories8m")
    with pytest.raises(L3DError, match="pass a tokenizer"):
        hf.token_dataset(["once upon a time"])
    with pytest.raises(L3DError, match="at least 2"):
        hf.token_dataset([[1, 2, 3]])


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_precision_among_the_model_options_is_refused_by_name(saved_lm, key):
    """`model.options: {dtype: bfloat16}` loaded the model in bfloat16, and the run was then told
    to call model.float(), which a config cannot do."""
    path, _ = saved_lm
    source = runs.ModelSource(hf=str(path), options={key: "bfloat16"})
    with pytest.raises(L3DError) as err:
        runs.build_model(source)
    message = str(err.value)
    assert f"model.options.{key}" in message and "float32" in message
    assert "model.float()" not in message and "\n" not in message
    with pytest.raises(L3DError, match=r"unknown options \['colour'\]; valid: attn_implementation"):
        runs.build_model(runs.ModelSource(hf=str(path), options={"colour": 1}))


@pytest.mark.slow
def test_synthetic_transformer_demo_subnetworks_are_purer_than_random_directions(tmp_path):
    from l3d.demos import synthetic_transformer

    summary = synthetic_transformer.main(
        ["--out", str(tmp_path), "--epochs", "5", "--n-per-task", "40", "--n-references", "3"]
    )
    assert min(summary["answer_accuracy"].values()) > 0.5
    assert summary["purity"] > summary["purity_random_directions"] + 0.1
    assert hf.load_causal_lm(tmp_path / "model").config.vocab_size == synthetic_transformer.VOCAB


def test_causal_lm_without_per_token_is_refused(saved_lm):
    _, model = saved_lm
    ids = torch.randint(2, len(WORDS), (6, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0
    for data in (ids, {"input_ids": ids, "attention_mask": mask}):
        with pytest.raises(L3DError, match=r"sequence axis.*per_token=True") as err:
            l3d.decompose(
                model, data, params=BLOCK[:1], n_subnetworks=2, divergence="kl", epochs=1,
                batch_size=4, progress=False,
            )  # fmt: skip
        assert "\n" not in str(err.value)


def test_missing_local_folder_is_named_before_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in (
        tmp_path / "no" / "model",
        str(tmp_path / "no" / "model"),
        "./model",
        "~/x/y/z",
    ):
        for load in (hf.load_causal_lm, hf.load_tokenizer):
            with pytest.raises(
                L3DError,
                match=r"^cannot load a \w+( LM)? from '.*': no such folder\. .*save_pretrained",
            ) as err:
                load(missing)
            assert "Repo id" not in str(err.value) and "\n" not in str(err.value)


def test_prepare_fits_the_presets_warm_start_to_the_epochs(saved_lm, tmp_path):
    path, _ = saved_lm
    text = tmp_path / "t.txt"
    text.write_text("once upon a time there was\nthe cat sat\nthe big dog ran\n")
    setup = hf.prepare(path, text, params=BLOCK, n_subnetworks=2, rank=1, epochs=2)
    assert setup.config.epochs == 2 and setup.config.warm_start_epochs == 0
    assert hf.prepare(path, text, params=BLOCK, n_subnetworks=2).config.warm_start_epochs == 10


def test_token_datasets_that_cannot_be_fed_to_a_model_are_refused(tmp_path):
    """Found by a scripted pass of misuse: each of these either died in Python or torch, or built
    ids that would later index past the embedding (or silently truncated float tokens)."""
    two = [[1, 2, 3], [4, 5]]
    cases = [
        (lambda: hf.token_dataset(two, seq_len=2.5), r"seq_len must be an integer >= 1"),
        (lambda: hf.token_dataset(two, min_tokens=0), r"min_tokens must be an integer >= 1"),
        (lambda: hf.token_dataset([[1, -2, 3], [4, 5]]), r"token id -2 is negative"),
        (
            lambda: hf.token_dataset([[1, -2, 3], [4, 5]], vocab_size=10),
            r"token id -2 is negative",
        ),
        (lambda: hf.token_dataset([[1, 2**70], [3, 4]]), r"token id 1180591620717411303424"),
        (
            lambda: hf.token_dataset(two, pad_token_id=99, vocab_size=10),
            r"pad_token_id 99 is outside the model's vocabulary of 10",
        ),
        (lambda: hf.token_dataset(two, pad_token_id=-1), r"pad_token_id -1"),
        (lambda: hf.token_dataset(torch.rand(3, 4)), r"token ids must be integers.*float32"),
        (
            lambda: hf.token_dataset(torch.ones(2, 3, 4, dtype=torch.long)),
            r"1-D \(one document\) or 2-D \(one per row\).*\(2, 3, 4\)",
        ),
    ]
    cases += [
        (lambda: hf.token_dataset(two, n_sequences=2.5), r"n_sequences must be an integer >= 1"),
        (lambda: hf.token_dataset(two, n_sequences=0), r"n_sequences must be an integer >= 1"),
        (lambda: hf.token_dataset(two, n_sequences=True), r"n_sequences must be an integer >= 1"),
        (lambda: hf.token_dataset(two, chunk="no"), r"chunk must be true or false; got 'no'"),
        (lambda: hf.token_dataset(two, separator=5), r"separator must be a string; got 5"),
        (
            lambda: hf.token_dataset([[1, 2, 3]], min_tokens=2),
            r"the text source gave 1 sequence\(s\) .*: add documents, lower min_tokens",
        ),
    ]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc\n\x80")
    cases.append((lambda: hf.token_dataset(binary), r"binary\.txt is not UTF-8 text"))
    cases.append((lambda: hf.token_dataset(binary, separator=""), r"separator is empty"))
    for build, message in cases:
        with pytest.raises(L3DError, match=message) as err:
            build()
        assert "\n" not in str(err.value)


def test_a_file_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    """'weights.bin' exists here as a file: say so at once instead of asking the hub (minutes of
    retries offline)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    for load in (hf.load_causal_lm, hf.load_tokenizer):
        with pytest.raises(L3DError, match=r"'weights\.bin' is a file.*folder"):
            load("weights.bin")


def test_random_causal_lm_needs_a_transformers_config():
    with pytest.raises(L3DError, match=r"transformers config.*got dict"):
        hf.random_causal_lm({"vocab_size": 10})


def test_a_model_folder_whose_weights_do_not_fit_its_config_is_one_line(saved_lm, tmp_path):
    """config.json edited after saving (another vocabulary size), or truncated weights, failed in
    transformers with "look at the above report" (a report `-q` hides) or a SafetensorError."""
    import json
    import shutil

    path, _ = saved_lm
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "vocab_size": 20}))
    with pytest.raises(l3d.L3DError, match=r"its config.json and the weights disagree on a size"):
        hf.load_causal_lm(edited)
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(l3d.L3DError, match=r"not a readable safetensors file"):
        hf.load_causal_lm(truncated)


def test_text_data_that_the_model_cannot_take_is_named_before_any_forward(saved_lm, tmp_path):
    """A run's `data: {text: ...}`: a seq_len past the model's positions, or a tokenizer with more
    tokens than the model has logits, ended in torch's "index out of range in self"."""
    import shutil

    path, _ = saved_lm
    text = tmp_path / "text.txt"
    text.write_text("once upon a time\nthe cat sat\n")
    model = hf.load_causal_lm(path)
    source = runs.DataSource(text=str(text), options={"seq_len": 64})
    with pytest.raises(L3DError, match=r"seq_len 64 is more than the model's 32 positions"):
        runs.build_data(source, runs.ModelSource(hf=str(path)), model)
    small = tmp_path / "small"  # the same tokenizer beside a model of fewer logits
    hf.random_causal_lm(tiny_config(vocab=len(WORDS) - 3), small, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            shutil.copy(path / name, small / name)
    source = runs.DataSource(text=str(text), options={"seq_len": 8})
    with pytest.raises(L3DError, match=r"the tokenizer has \d+ tokens but the model only \d+"):
        runs.build_data(source, runs.ModelSource(hf=str(small)), hf.load_causal_lm(small))
    assert runs.build_data(source, runs.ModelSource(hf=str(path)), model)["input_ids"].shape == (
        2,
        8,
    )


def test_model_and_tokenizer_folders_are_relative_to_the_config(tmp_path, monkeypatch):
    """`hf: ./base` (or `base`, a folder beside the config) and `data.options.tokenizer` were
    resolved against the current folder and stored as given: the run failed from elsewhere,
    after a minute of hub retries. Hub names stay as they are."""
    import yaml

    (tmp_path / "configs" / "base").mkdir(parents=True)
    (tmp_path / "configs" / "tok").mkdir()
    text = tmp_path / "configs" / "text.txt"
    text.write_text("a b\n")
    spec = {
        "model": {"hf": "./base"},
        "data": {"text": "text.txt", "options": {"tokenizer": "tok"}},
        "l3d": {"params": ["w"], "n_subnetworks": 2, "per_token": True},
    }
    config = tmp_path / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    loaded = runs.load_spec(config)
    assert loaded.model.hf == str(tmp_path / "configs" / "base")
    assert loaded.data.options["tokenizer"] == str(tmp_path / "configs" / "tok")
    spec["model"]["hf"] = "roneneldan/TinyStories-8M"
    config.write_text(yaml.safe_dump(spec))
    assert runs.load_spec(config).model.hf == "roneneldan/TinyStories-8M"


def test_a_model_folder_without_tokenizer_files_is_named(saved_lm, tmp_path):
    """transformers falls back to an empty tokenizer (one token, every text encodes to []): the
    run then said its text gave 0 sequences, pointing at the text file."""
    import shutil

    path, _ = saved_lm
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(L3DError, match=r"no usable tokenizer in '.*bare'.*data.options.tokenizer"):
        hf.load_tokenizer(bare)


def test_byte_fragment_tokens_show_as_their_bytes(tmp_path):
    """A byte-level BPE token holding part of a multi-byte character decodes alone to U+FFFD, so
    every such token looked the same on the pages; each now shows its bytes (\\xe2...), a whole
    character as itself."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = tmp_path / "text.txt"
    text.write_text("price 5€ and 3€, café au lait\n" * 8)
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(text)], vocab_size=256, min_frequency=1)  # the 256 bytes, no merges
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    fragments = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert len(fragments) == 128  # the non-ASCII bytes
    labels = {i: hf.token_text(tokenizer, i) for i in fragments}
    assert all("\ufffd" not in t for t in labels.values())
    assert len(set(labels.values())) == len(fragments)
    euro = tokenizer.encode("€", add_special_tokens=False)
    assert [hf.token_text(tokenizer, i) for i in euro] == ["\\xe2", "\\x82", "\\xac"]
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    assert hf.token_text(tokenizer, a) == "a"
    assert hf.token_text(None, 7) == "7"
