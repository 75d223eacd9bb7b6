#!/usr/bin/env python
"""The d2l baseline pipeline, reimplemented faithfully: the baseline of the benchmark.

What d2l's AlexNet chapter runs, piece by piece:

- the network: the chapter's ``nn.Sequential``, copied below unchanged;
- the data: ``d2l.load_data_fashion_mnist(128, resize=224)``, i.e. torchvision's
  ``FashionMNIST`` with ``Compose([Resize(224), ToTensor()])``, a ``DataLoader``
  with batch 128, ``shuffle=True`` for training, ``shuffle=False`` for test, and
  ``d2l.get_dataloader_workers()`` = 4 worker processes (PIL resizes every image
  in the workers);
- the loop: ``d2l.train_ch6``: Xavier-uniform init of every Conv2d/Linear weight,
  plain ``SGD(lr)``, ``CrossEntropyLoss``, fp32, and per batch
  ``metric.add(l * X.shape[0], d2l.accuracy(y_hat, y), X.shape[0])`` through
  d2l's ``Accumulator`` (``float()`` of each: one host sync per step); the timer
  runs from after the batch is fetched to after that bookkeeping, so d2l's
  "examples/sec" counts the training steps only, not data loading or evaluation;
  ``evaluate_accuracy_gpu`` after every epoch.

Only additions: a training/test subset (the first N examples, as distalex's
``data.train_limit``/``test_limit``), a step limit, the image size, the thread
count and a seed, so the benchmark can run a short schedule; and an end-to-end
figure (training examples / wall time from building the datasets to the last
evaluation, data loading and evaluation included).

torchvision reads the unpacked IDX files from ``ROOT/FashionMNIST/raw/`` and has
no internet here, so the Debian ``.gz`` files (or unpacked copies) are unpacked
once into a cache folder.  This file does not import distalex.

    python bench/d2l_baseline.py --train-limit 1024 --max-steps 8 --test-limit 512
    python bench/d2l_baseline.py --epochs 1          # the d2l data, one epoch
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import data

from distalex.runtime.io import atomic_write, write_json

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# md5 of the unpacked IDX files (Debian re-compressed the archives; contents are the originals).
FILES = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


def d2l_net() -> nn.Sequential:
    """The chapter's network, verbatim (comments translated)."""
    return nn.Sequential(
        # An 11x11 window to capture objects; stride 4 to shrink height and width.
        nn.Conv2d(1, 96, kernel_size=11, stride=4, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        # Smaller window, padding 2 keeps height and width; more output channels.
        nn.Conv2d(96, 256, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        # Three consecutive conv layers with small windows.
        nn.Conv2d(256, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        # Fully connected layers many times LeNet's; dropout against overfitting.
        nn.Linear(6400, 4096),
        nn.ReLU(),
        nn.Dropout(p=0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(p=0.5),
        # Output layer: 10 classes for Fashion-MNIST.
        nn.Linear(4096, 10),
    )


# --------------------------------------------------------------------------- data (d2l)


def _source_file(src: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        for folder in (src, src / "FashionMNIST" / "raw"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"{stem}(.gz) not found in {src}; install 'dataset-fashion-mnist' or pass --data-root")


def prepare_torchvision_root(src: str, cache: str) -> str:
    """Unpack the four IDX files into CACHE/FashionMNIST/raw/ (once; atomic; md5-checked)
    and return CACHE, the ``root`` torchvision's ``FashionMNIST(root, download=False)`` wants."""
    raw = Path(cache) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem, md5 in FILES.items():
        dst = raw / stem
        if dst.is_file() and dst.stat().st_size > 0:
            continue
        path = _source_file(Path(src), stem)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            payload = fh.read()
        if hashlib.md5(payload).hexdigest() != md5:
            raise RuntimeError(f"{path} is corrupt (md5 of its contents differs from the original's)")
        atomic_write(dst, payload)  # concurrent runs may race here; the content is the same
    return str(cache)


def load_data_fashion_mnist(batch_size, resize, root, train_limit=None, test_limit=None, workers=4):
    """d2l.load_data_fashion_mnist, plus first-N subsets (data.Subset keeps the rest unchanged)."""
    import torchvision
    from torchvision import transforms

    trans = [transforms.ToTensor()]
    if resize:
        trans.insert(0, transforms.Resize(resize))
    trans = transforms.Compose(trans)
    mnist_train = torchvision.datasets.FashionMNIST(root=root, train=True, transform=trans, download=False)
    mnist_test = torchvision.datasets.FashionMNIST(root=root, train=False, transform=trans, download=False)
    if train_limit is not None and train_limit < len(mnist_train):
        mnist_train = data.Subset(mnist_train, range(train_limit))
    if test_limit is not None and test_limit < len(mnist_test):
        mnist_test = data.Subset(mnist_test, range(test_limit))
    return (
        data.DataLoader(mnist_train, batch_size, shuffle=True, num_workers=workers),
        data.DataLoader(mnist_test, batch_size, shuffle=False, num_workers=workers),
    )


# --------------------------------------------------------------------------- loop (d2l)


class Accumulator:
    """d2l.Accumulator: sums n variables; ``float()`` of each addend (a host sync for tensors)."""

    def __init__(self, n):
        self.data = [0.0] * n

    def add(self, *args):
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def __getitem__(self, idx):
        return self.data[idx]


class Timer:
    """d2l.Timer (start/stop/sum)."""

    def __init__(self):
        self.times = []
        self.tik = None

    def start(self):
        self.tik = time.time()

    def stop(self):
        self.times.append(time.time() - self.tik)
        return self.times[-1]

    def sum(self):
        return sum(self.times)


def accuracy(y_hat, y):
    """d2l.accuracy: number of correct predictions (a Python float)."""
    if len(y_hat.shape) > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


def evaluate_accuracy_gpu(net, data_iter, device=None):
    """d2l.evaluate_accuracy_gpu."""
    if isinstance(net, nn.Module):
        net.eval()
        if not device:
            device = next(iter(net.parameters())).device
    metric = Accumulator(2)
    with torch.no_grad():
        for X, y in data_iter:
            X = X.to(device)
            y = y.to(device)
            metric.add(accuracy(net(X), y), y.numel())
    return metric[0] / metric[1]


def train_ch6(net, train_iter, test_iter, num_epochs, lr, device, max_steps=None, log=print):
    """d2l.train_ch6 without the plot; ``max_steps`` ends training early (then evaluates)."""

    def init_weights(m):
        if type(m) == nn.Linear or type(m) == nn.Conv2d:
            nn.init.xavier_uniform_(m.weight)

    net.apply(init_weights)
    log(f"training on {device}")
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss = nn.CrossEntropyLoss()
    timer, num_batches = Timer(), len(train_iter)
    seen, steps, epochs_done, batch0 = 0, 0, 0.0, None
    train_l = train_acc = test_acc = float("nan")
    for epoch in range(num_epochs):
        metric = Accumulator(3)
        net.train()
        for i, (X, y) in enumerate(train_iter):
            timer.start()
            optimizer.zero_grad()
            X, y = X.to(device), y.to(device)
            y_hat = net(X)
            l = loss(y_hat, y)
            l.backward()
            optimizer.step()
            with torch.no_grad():
                metric.add(l * X.shape[0], accuracy(y_hat, y), X.shape[0])
            timer.stop()
            if batch0 is None:
                batch0 = X.shape[0]
            train_l = metric[0] / metric[2]
            train_acc = metric[1] / metric[2]
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        seen += metric[2]
        epochs_done += (i + 1) / num_batches
        test_acc = evaluate_accuracy_gpu(net, test_iter)
        log(f"epoch {epoch + 1}: loss {train_l:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    # d2l prints metric[2] * num_epochs / timer.sum(): the examples of all epochs over the step time.
    examples_per_sec = seen / timer.sum()
    # Without the first step (allocator and kernel warm-up), for comparisons of steady speed.
    rest = timer.times[1:]
    steady = (seen - batch0) / sum(rest) if rest and sum(rest) > 0 else examples_per_sec
    log(f"loss {train_l:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}")
    log(f"{examples_per_sec:.1f} examples/sec on {device}")
    return {
        "loss": train_l,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "examples_per_sec": examples_per_sec,
        "steady_examples_per_sec": steady,
        "train_examples": seen,
        "steps": steps,
        "epochs": epochs_done,
        "train_time_s": timer.sum(),
    }


# --------------------------------------------------------------------------- entry point


def try_gpu():
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def run(
    image_size=224,
    train_limit=None,
    test_limit=None,
    epochs=1,
    max_steps=None,
    batch_size=128,
    lr=0.01,
    workers=4,
    threads=None,
    seed=0,
    data_root=None,
    cache_dir=None,
    device=None,
    log=print,
) -> dict:
    """The d2l experiment on a (possibly) short schedule; returns its figures."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device(device) if device else try_gpu()
    src = data_root or os.environ.get("DISTALEX_DATA") or DEBIAN_FASHION_MNIST
    cache = cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distalex-bench"
    )
    root = prepare_torchvision_root(src, cache)
    net = d2l_net()
    wall0 = time.perf_counter()  # end to end: datasets, loaders, steps, evaluation
    train_iter, test_iter = load_data_fashion_mnist(batch_size, image_size, root, train_limit, test_limit, workers)
    out = train_ch6(net, train_iter, test_iter, epochs, lr, device, max_steps=max_steps, log=log)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - wall0
    out.update(
        {
            "wall_time_s": wall,
            "e2e_examples_per_sec": out["train_examples"] / wall,
            "image_size": image_size,
            "batch_size": batch_size,
            "workers": workers,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "train_size": len(train_iter.dataset),
            "test_size": len(test_iter.dataset),
        }
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-limit", type=int, default=None, help="first N training images (default all)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop training after N steps, then evaluate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (d2l: 4)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:0 if available, else cpu (d2l.try_gpu)")
    p.add_argument(
        "--data-root",
        default=None,
        help=f"folder with the IDX files (default $DISTALEX_DATA or {DEBIAN_FASHION_MNIST})",
    )
    p.add_argument(
        "--cache-dir", default=None, help="where to unpack for torchvision (default ~/.cache/distalex-bench)"
    )
    p.add_argument("--json-out", default=None, help="write the figures here as JSON")
    a = p.parse_args(argv)
    out = run(
        a.image_size,
        a.train_limit,
        a.test_limit,
        a.epochs,
        a.max_steps,
        a.batch_size,
        a.lr,
        a.workers,
        a.threads,
        a.seed,
        a.data_root,
        a.cache_dir,
        a.device,
        log=lambda s: print(s, flush=True),
    )
    print(f"end-to-end {out['e2e_examples_per_sec']:.1f} examples/sec (wall {out['wall_time_s']:.1f} s)", flush=True)
    print("BASELINE_JSON " + json.dumps(out), flush=True)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json(a.json_out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
