"""The four classic estimators behind ``classic:logreg|lgbm|cnn|lstm``, one small interface.

``fit(fit_design, y, w, val_design, y_val, w_val)`` trains on class indices ``0..k-1`` with
per-row weights (the class weights), ``predict_proba(design) -> (n, k)``, ``save(dir)`` /
``load(dir)``. Heavy libraries are imported inside the methods.

Reproducibility: every estimator is seeded; LightGBM runs with ``deterministic=True`` and one
thread; torch with ``torch.manual_seed``, ``use_deterministic_algorithms(True)`` and one thread
(restored afterwards), batches shuffled by a seeded generator. The same config on the same data
gives bit-identical probabilities (tested).

Why these saved formats: logistic regression is stored as its coefficients (npz) and applied
with numpy (a softmax of ``X @ W.T + b``, what scikit-learn does), LightGBM as its own text
model, the networks as a torch ``state_dict`` loaded with ``weights_only=True``. No pickles, so
loading someone's artifact cannot run code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from atm.errors import require
from atm.eval.classic.design import Design, Standardizer


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Estimator:
    kind = ""

    def __init__(self, cfg: Any, n_classes: int):
        self.cfg = cfg
        self.k = n_classes
        self.info: dict[str, Any] = {}

    def fit(self, d: Design, y: np.ndarray, w: np.ndarray, dv: Design | None, yv: np.ndarray | None,
            wv: np.ndarray | None) -> None:
        raise NotImplementedError

    def predict_proba(self, d: Design) -> np.ndarray:
        raise NotImplementedError

    def save(self, out: Path) -> None:
        raise NotImplementedError

    def load(self, src: Path) -> "Estimator":
        raise NotImplementedError


# ------------------------------------------------------------------------------------ logreg
class LogReg(Estimator):
    """Multinomial logistic regression on standardized features (scikit-learn, lbfgs)."""

    kind = "logreg"

    def fit(self, d, y, w, dv, yv, wv):
        lm = require("sklearn.linear_model", "eval", "scikit-learn")
        x = d.table
        self.scaler = Standardizer().fit(x)
        clf = lm.LogisticRegression(C=self.cfg.c, max_iter=self.cfg.max_iter, random_state=self.cfg.seed)
        clf.fit(self.scaler.transform(x), y, sample_weight=w)
        coef, intercept = clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)
        if coef.shape[0] == 1 and self.k == 2:  # binary: sigmoid(z) == softmax([0, z])
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        self.coef, self.intercept = coef, intercept
        self.info = {"n_iter": int(np.max(clf.n_iter_)), "converged": bool(np.max(clf.n_iter_) < self.cfg.max_iter)}

    def predict_proba(self, d):
        z = self.scaler.transform(d.table).astype(np.float64) @ self.coef.T + self.intercept
        return _softmax(z)

    def save(self, out):
        np.savez(out / "model.npz", coef=self.coef, intercept=self.intercept, mean=self.scaler.mean,
                 std=self.scaler.std)

    def load(self, src):
        z = np.load(src / "model.npz")
        self.coef, self.intercept = z["coef"], z["intercept"]
        self.scaler = Standardizer(z["mean"], z["std"])
        return self


# ------------------------------------------------------------------------------------ lgbm
class LGBM(Estimator):
    """Gradient-boosted trees (LightGBM), early-stopped on the validation tail's weighted log-loss."""

    kind = "lgbm"

    def _params(self) -> dict[str, Any]:
        c = self.cfg
        return {"objective": "multiclass", "num_class": self.k, "learning_rate": c.learning_rate,
                "num_leaves": c.num_leaves, "min_data_in_leaf": c.min_child_samples,
                "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
                "seed": c.seed, "deterministic": True, "force_row_wise": True, "num_threads": c.threads,
                "verbose": -1}

    def fit(self, d, y, w, dv, yv, wv):
        lgb = require("lightgbm", "eval")
        train = lgb.Dataset(d.table, label=y, weight=w, feature_name=_safe_names(d.table_names()),
                            free_raw_data=True)
        valid_sets, callbacks = [], []
        if dv is not None and len(yv):
            valid_sets = [lgb.Dataset(dv.table, label=yv, weight=wv, reference=train)]
            callbacks = [lgb.early_stopping(self.cfg.patience_rounds, verbose=False)]
        booster = lgb.train(self._params(), train, num_boost_round=self.cfg.n_estimators, valid_sets=valid_sets,
                            callbacks=callbacks)
        best = booster.best_iteration or booster.current_iteration()
        self.model_str = booster.model_to_string(num_iteration=best)
        self.booster = lgb.Booster(model_str=self.model_str)
        gain = self.booster.feature_importance("gain")
        names = d.table_names()
        top = np.argsort(-gain)[:10]
        self.info = {"rounds": int(best), "top_features_by_gain": [names[i] for i in top if gain[i] > 0]}

    def predict_proba(self, d):
        p = np.asarray(self.booster.predict(d.table), dtype=np.float64)
        return p.reshape(len(d.table), self.k)

    def save(self, out):
        (out / "model.txt").write_text(self.model_str)

    def load(self, src):
        lgb = require("lightgbm", "eval")
        self.model_str = (src / "model.txt").read_text()
        self.booster = lgb.Booster(model_str=self.model_str)
        return self


def _safe_names(names: list[str]) -> list[str]:
    """LightGBM rejects some characters in feature names (JSON special chars)."""
    return [n.replace("[", "(").replace("]", ")").replace(",", "_").replace(":", "_").replace('"', "")
            for n in names]


# ------------------------------------------------------------------------------------ torch
@contextlib.contextmanager
def torch_determinism(seed: int, threads: int):
    """Seeded, deterministic, single-thread torch for the block; global settings restored after."""
    torch = require("torch", "train")
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, int(threads)))
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield torch
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _build_net(kind: str, channels: int, n_tab: int, k: int, hidden: int):
    import torch.nn as nn

    class CNN(nn.Module):
        """Two 3-wide convolutions over the window, global average pool, then an MLP head with the indicators."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv1d(channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Conv1d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool1d(1))
            self.head = nn.Sequential(nn.Linear(hidden + n_tab, hidden), nn.ReLU(), nn.Dropout(0.1),
                                      nn.Linear(hidden, k))

        def forward(self, xw, xt):
            import torch

            h = self.conv(xw.transpose(1, 2)).squeeze(-1)
            return self.head(torch.cat([h, xt], dim=1))

    class LSTM(nn.Module):
        """One LSTM layer over the window (oldest to newest); last hidden state + indicators -> MLP head."""

        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(channels, hidden, batch_first=True)
            self.head = nn.Sequential(nn.Linear(hidden + n_tab, hidden), nn.ReLU(), nn.Dropout(0.1),
                                      nn.Linear(hidden, k))

        def forward(self, xw, xt):
            import torch

            _, (h, _) = self.rnn(xw)
            return self.head(torch.cat([h[-1], xt], dim=1))

    return CNN() if kind == "cnn" else LSTM()


class TorchNet(Estimator):
    """A small 1D-CNN or LSTM over the window plus the indicators; weighted cross-entropy, AdamW,
    early stopping on the validation tail's weighted loss (the best epoch's weights are kept)."""

    def __init__(self, cfg: Any, n_classes: int, kind: str):
        super().__init__(cfg, n_classes)
        self.kind = kind

    def _tensors(self, d: Design):
        import torch

        xw = self.wscaler.transform(d.window)
        xt = self.tscaler.transform(d.indicators)
        return torch.from_numpy(xw), torch.from_numpy(xt)

    def fit(self, d, y, w, dv, yv, wv):
        c = self.cfg
        with torch_determinism(c.seed, c.threads) as torch:
            self.wscaler = Standardizer().fit(d.window, axes=(0, 1))
            self.tscaler = Standardizer().fit(d.indicators)
            self.shape = (d.window.shape[2], d.indicators.shape[1])
            self.net = _build_net(self.kind, self.shape[0], self.shape[1], self.k, c.hidden)
            xw, xt = self._tensors(d)
            yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
            # class weights enter as the loss weights; w holds the same numbers per row
            cw = np.zeros(self.k, dtype=np.float32)
            for j in range(self.k):
                if (y == j).any():
                    cw[j] = float(w[y == j][0])
            loss_fn = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(cw))
            opt = torch.optim.AdamW(self.net.parameters(), lr=c.nn_lr, weight_decay=c.weight_decay)
            gen = torch.Generator().manual_seed(c.seed)
            has_val = dv is not None and yv is not None and len(yv) > 0
            if has_val:
                vxw, vxt = self._tensors(dv)
                vy = torch.from_numpy(np.asarray(yv, dtype=np.int64))
            best, best_state, bad, history = np.inf, None, 0, []
            n = len(yt)
            for epoch in range(c.epochs):
                self.net.train()
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for s in range(0, n, c.batch_size):
                    b = perm[s:s + c.batch_size]
                    opt.zero_grad()
                    loss = loss_fn(self.net(xw[b], xt[b]), yt[b])
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(b)
                rec = {"epoch": epoch + 1, "train_loss": round(total / n, 5)}
                if has_val:
                    self.net.eval()
                    with torch.no_grad():
                        vl = float(loss_fn(self.net(vxw, vxt), vy))
                    rec["val_loss"] = round(vl, 5)
                    if vl < best - 1e-6:
                        best, bad = vl, 0
                        best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                    else:
                        bad += 1
                history.append(rec)
                if has_val and bad >= c.patience:
                    break
            if best_state is not None:
                self.net.load_state_dict(best_state)
            self.net.eval()
            self.info = {"epochs_run": len(history), "best_val_loss": None if best == np.inf else round(best, 5),
                         "history": history,
                         "parameters": int(sum(p.numel() for p in self.net.parameters()))}

    def predict_proba(self, d):
        with torch_determinism(self.cfg.seed, self.cfg.threads) as torch:
            xw, xt = self._tensors(d)
            out = []
            with torch.no_grad():
                for s in range(0, len(xw), 4096):
                    out.append(torch.softmax(self.net(xw[s:s + 4096], xt[s:s + 4096]), dim=1).double().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.k))

    def save(self, out):
        import torch

        torch.save(self.net.state_dict(), out / "model.pt")
        np.savez(out / "scaler.npz", wmean=self.wscaler.mean, wstd=self.wscaler.std, tmean=self.tscaler.mean,
                 tstd=self.tscaler.std, shape=np.array(self.shape))

    def load(self, src):
        torch = require("torch", "train")
        z = np.load(src / "scaler.npz")
        self.wscaler = Standardizer(z["wmean"], z["wstd"])
        self.tscaler = Standardizer(z["tmean"], z["tstd"])
        self.shape = tuple(int(v) for v in z["shape"])
        self.net = _build_net(self.kind, self.shape[0], self.shape[1], self.k, self.cfg.hidden)
        self.net.load_state_dict(torch.load(src / "model.pt", weights_only=True))
        self.net.eval()
        return self


def make_estimator(cfg: Any, n_classes: int) -> Estimator:
    if cfg.model == "logreg":
        return LogReg(cfg, n_classes)
    if cfg.model == "lgbm":
        return LGBM(cfg, n_classes)
    return TorchNet(cfg, n_classes, cfg.model)
