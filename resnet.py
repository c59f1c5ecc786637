"""
Gradient Fan-in Asymmetry on ResNet-50: train, dump per-block gradient norms, ablate blocks.

ResNet-50 (He et al. 2016, torchvision's v1.5 layout: stride on the 3x3 conv) in a few dozen
lines: stem, 16 bottleneck blocks (3-4-6-3, expansion 4, BatchNorm, a projection shortcut on
the first block of each stage), global pool, linear head. 25,557,032 parameters at 1000
classes, exactly torchvision's resnet50. Options: a small-image stem (3x3 conv stride 1, no
max-pool) for inputs up to 64 px, any number of input channels (Fashion-MNIST is fed as
one channel, not replicated to three: replication only triples the stem's input bandwidth
and equals summing its filters), and a width multiplier (tests only).

Passthrough (importance ablation): a block's residual branch is removed, out = relu(shortcut(x));
a block with a projection shortcut keeps the projection, an identity block becomes relu(x) = x.

Training follows Table 5: AdamW (0.9, 0.999), weight decay 0.05 (not on BN/bias), peak lr 5e-4,
per-step cosine with 5 warm-up epochs, global batch 512, 30 epochs, no clipping, seed 324709.
The schedule is train.py's (gfa.training.cosine_lr: warm-up lr * (it + 1) / (warmup + 1); the
committed Fashion-MNIST run used lr * (it + 1) / warmup, 0.2 % higher during its 585 warm-up steps).
float32 by default, as the paper trains (--dtype=bfloat16 for bf16 autocast); channels_last +
torch.compile on GPUs, DDP under torchrun.

    python resnet.py --dataset=cifar10 --download=True             # fetches CIFAR-10 into data/cifar10 once
    python resnet.py --dataset=folder --data_dir=/data/my_images     # <data_dir>/{train,val}/<class>/<image>
    python resnet.py --dataset=fashion_mnist --data_dir=/usr/share/datasets/fashion-mnist
    torchrun --nproc_per_node=8 resnet.py --dataset=imagenet --data_dir=/data/imagenet
    python resnet.py --out_dir=out/resnet --analyse=True          # importance of a trained (or stopped) run

Data, and its recipe:
  'imagenet', 'folder'  an ImageFolder tree <data_dir>/{train,val}/<class>/<image> (val/ may be
                        test/); 'imagenet' only differs in its default folder, data/imagenet. Images
                        above 64 px get the ImageNet recipe (RandomResizedCrop image_size + flip;
                        evaluation: resize to image_size * 256/224 + center crop, skipped for an
                        image already image_size x image_size); images up to 64 px (all of one
                        size) the small-image recipe below. --augment=small|imagenet chooses.
  'cifar10', 'cifar100' torchvision's CIFAR10 / CIFAR100 reading <data_dir>/cifar-10-batches-py
                        (cifar-100-python), the python version's pickled batches; --download=True
                        fetches them first (with torchvision, needs the network); test batch: val.
  'fashion_mnist'       a folder with the four raw idx files (train-images-idx3-ubyte,
                        train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
                        gzipped or not; Debian: `apt-get install dataset-fashion-mnist` puts them in
                        /usr/share/datasets/fashion-mnist); t10k: val.
  'synthetic'           toy images (tests).
The small-image recipe: the images held as tensors on the device and augmented there (random crop
with 4-pixel zero padding + flip), normalised with the training set's per-channel mean and std
(Fashion-MNIST: its published 0.2860 / 0.3530), the 3x3 stem, evaluation at the images' own size.
DataLoader workers (ImageNet recipe) are capped at this rank's share of the CPU cores.

Outputs: a run directory in out_dir (gfa/rundir.py documents it; kind "resnet", so the LM
scripts refuse its checkpoint with a one-line error): model_config.json (ResNet50's arguments),
ckpt.pt (with best_val_acc and the RNG state), grad_norms.npz (groups 'stem', 'layer.0'..
'layer.15', 'head'; fanin.py reads it), log.txt, and after training importance.json:
{"metric": "top1_drop", "baseline": top-1 of the full model (fraction), "importance": [16 drops,
baseline - top-1 with block i's residual branch removed], "accuracy": [16 ablated top-1s],
"layer_names", and, when the run has a gradient dump, "share" (Eq. 2) and "spearman": {rho, p}
of share vs importance}.
"""
import gzip
import os
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gfa import rundir
from gfa.cli import UserError, cli, read_config
from gfa.data import dataset_dir
from gfa.device import autocast_for
from gfa.theory import spearman
from gfa.training import (FiniteGuard, GradStep, adamw, check_init_from, check_optimizer_settings, check_resume,
                          check_state, check_weights, cosine_lr, on_master, set_lr, setup_distributed, teardown, use_compile)

# ---- defaults (override with --key=value or a config file) -----------------------------------
out_dir = "out/resnet"           # the run directory
dataset = "imagenet"             # 'imagenet' (the paper) | 'cifar10' | 'cifar100' | 'folder' (an ImageFolder tree) | 'fashion_mnist' | 'synthetic'
data_dir = ""                    # '' -> this repository's data/<dataset> (fashion_mnist: else Debian's /usr/share/datasets/fashion-mnist)
download = False                 # cifar10 / cifar100: fetch the dataset into data_dir first (needs the network)
augment = "auto"                 # imagenet / folder recipe: 'auto' ('small' for images up to 64 px) | 'small' | 'imagenet'
stem = "auto"                    # 'imagenet' (7x7/2 + max-pool) | 'small' (3x3/1) | 'auto' (small for images up to 64 px)
width = 64                       # base width (64 = ResNet-50); smaller only for tests
image_size = 224                 # the ImageNet recipe's crop / synthetic size (small images keep their own size)
epochs = 30                      # passes over the training images
warmup_epochs = 5.0              # linear warm-up, then a per-step cosine
batch_size = 512                 # global, over all DDP ranks
learning_rate = 5e-4             # peak (AdamW)
min_lr = 1e-6                    # end of the cosine
weight_decay = 0.05              # not on BatchNorm or biases
beta1 = 0.9                      # AdamW
beta2 = 0.999                    # AdamW
seed = 324709                    # init, epoch order and augmentation
log_interval = 50                # steps
ckpt_interval = 0                # steps; 0 = at the end of every epoch only
stop_iter = 0                    # stop (and checkpoint) at this step without changing the schedule; 0 = run to the end
init_from = "scratch"            # 'scratch' | 'resume' (from out_dir/ckpt.pt)
overwrite = False                # True: a new run may replace the run already in out_dir
allow_changes = ""               # resume: settings allowed to differ from the checkpoint's, e.g. "epochs"
eval_batch_size = 1024           # per rank
importance = True                # after training: block ablation -> importance.json
analyse = False                  # only the importance analysis of out_dir's checkpoint
num_workers = 8                  # DataLoader workers per rank (imagenet recipe; at most the CPU cores per rank)
n_synthetic = 512                # synthetic train images (val: half)
device = "auto"                  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = "float32"                # float32 (the paper trains in it) | tf32 | bfloat16 | 'auto' (bf16 on GPUs, fp32 on CPU)
compile = None                   # None: on for GPUs, off on CPU
defaults = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))}

# settings a resume may change freely (where output goes, how often to log or save, the device);
# everything else shapes the run and must match the checkpoint's unless allow_changes names it
FREE_ON_RESUME = {"out_dir", "init_from", "overwrite", "allow_changes", "device", "compile", "num_workers", "download",
                  "log_interval", "ckpt_interval", "stop_iter", "eval_batch_size", "importance", "analyse"}
STAGES = ((3, 1), (4, 2), (6, 2), (3, 2))       # (blocks, first stride) per stage: 16 blocks
DATASETS = ("imagenet", "cifar10", "cifar100", "folder", "fashion_mnist", "synthetic")
SMALL_IMAGE = 64                                 # images up to this size: the small-image recipe and the 3x3 stem
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"    # apt-get install dataset-fashion-mnist
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---- model ------------------------------------------------------------------------------------
def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.branch = nn.Sequential(conv_bn(cin, width, 1), nn.ReLU(inplace=True),
                                    conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                    conv_bn(width, cout, 1))
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.passthrough = False

    def forward(self, x):
        s = self.shortcut(x)
        if self.passthrough:                 # residual branch removed; a projection is kept
            return F.relu(s)
        return F.relu(self.branch(x) + s)


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000, in_channels=3, small_stem=False, width=64):
        super().__init__()
        self.config = dict(num_classes=num_classes, in_channels=in_channels, small_stem=small_stem, width=width)
        if small_stem:   # keep the resolution of 28/32 px images: 3x3 stride 1, no max-pool
            self.stem = nn.Sequential(conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(conv_bn(in_channels, width, 7, 2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for s, (n, stride) in enumerate(STAGES):
            for b in range(n):
                blocks.append(Bottleneck(cin, width * 2 ** s, stride if b == 0 else 1))
                cin = 4 * width * 2 ** s
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():             # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def passthrough(self):
        """The blocks whose residual branch is removed, read from the blocks' own flags (the one source)."""
        return frozenset(i for i, blk in enumerate(self.blocks) if blk.passthrough)

    def min_image_size(self):
        """Smallest input that still leaves a 1x1 map for the last stage (total stride)."""
        return 8 if self.config["small_stem"] else 32

    def set_passthrough(self, blocks):
        blocks = frozenset(int(i) for i in blocks)
        if any(not 0 <= i < len(self.blocks) for i in blocks):
            raise UserError(f"passthrough blocks {sorted(blocks)}: indices must be in [0, {len(self.blocks) - 1}]")
        for i, blk in enumerate(self.blocks):
            blk.passthrough = i in blocks

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def param_groups_by_layer(self):
        """{'stem', 'layer.0'..'layer.15', 'head'}: the groups of the gradient dump."""
        return ({"stem": list(self.stem.parameters())}
                | {f"layer.{i}": list(b.parameters()) for i, b in enumerate(self.blocks)}
                | {"head": list(self.fc.parameters())})


# ---- data -------------------------------------------------------------------------------------
def check_data_dir(root, holds, other_way=""):
    """One-line errors for a data path that is a file or missing; holds: what the folder must hold."""
    if os.path.isfile(root):
        raise UserError(f"data_dir {root} is a file, not a folder (an archive? unpack it first): pass "
                        f"--data_dir=<the folder holding {holds}>")
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root} does not exist: pass --data_dir=<the folder holding {holds}>{other_way}")


def loader_workers(requested):
    """DataLoader workers per rank: as requested, at most this rank's share of the CPU cores this
    process may use (more only wait for a core, and PyTorch warns about them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(requested, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


MIN_STD = 1 / 255   # the smallest per-channel std images are normalised by: one grey level


def channel_stats(x):
    """Per-channel mean and (population) std of uint8 images [N, C, H, W], as fractions of 255."""
    s, s2 = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):           # float64 a chunk at a time: exact, and no 8x copy of the set
        c = chunk.double()
        s, s2 = s + c.sum((0, 2, 3)), s2 + (c * c).sum((0, 2, 3))
    n = x.numel() // x.shape[1]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp(min=0).sqrt() / 255
    if (std < MIN_STD).any():   # a constant channel (a grey-scale set stored as RGB, a blank channel)
        print(f"note: channel(s) {(std < MIN_STD).nonzero().flatten().tolist()} of the training images are (nearly) "
              f"constant: their std is taken as {MIN_STD:.3g} (one grey level), not divided by zero")
    return (mean / 255).tolist(), std.clamp(min=MIN_STD).tolist()


def normalised(x, mean, std):
    """uint8 images [N, C, H, W] -> float32 (x / 255 - mean) / std, per channel."""
    shape = (1, -1, 1, 1)
    return x.float().div_(255).sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


def image_tensors(xtr, ytr, xva, yva, num_classes, mean, std):
    """Small images held as tensors (on the GPU when training there), normalised per channel, with
    the small-image recipe: random crop with 4-pixel zero padding + flip (gpu_augment; a zero
    pixel is -mean/std once normalised), the 3x3 stem, evaluation at the images' own size."""
    return dict(kind="tensor", train=(normalised(xtr, mean, std), ytr), val=(normalised(xva, mean, std), yva),
                num_classes=num_classes, in_channels=xtr.shape[1], size=xtr.shape[-1], augment=True,
                fill=[-m / s for m, s in zip(mean, std)])


def read_idx(path):
    """A raw idx file (the MNIST format, gzipped or not) as a numpy uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if len(raw) - 4 - 4 * ndim != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root):
    paths = []
    for name in FMNIST_FILES:
        found = [p for p in (os.path.join(root, name), os.path.join(root, name + ".gz")) if os.path.isfile(p)]
        if not found:
            raise UserError(f"{root} has no {name}(.gz): point --data_dir at the folder holding the four Fashion-MNIST "
                            f"idx files (Debian: apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)")
        paths.append(found[0])
    xtr, ytr, xva, yva = (read_idx(p) for p in paths)
    if xtr.shape[1:] != (28, 28) or len(xtr) != len(ytr) or len(xva) != len(yva):
        raise UserError(f"the idx files in {root} do not look like Fashion-MNIST (images {xtr.shape}, labels {ytr.shape})")
    img = lambda x: torch.from_numpy(x.copy()).unsqueeze(1)
    lab = lambda y: torch.from_numpy(y.astype(np.int64))
    return image_tensors(img(xtr), lab(ytr), img(xva), lab(yva), 10, [FMNIST_MEAN], [FMNIST_STD])


def cifar(name, root):
    """(torchvision's dataset class, its root): root may also be the unpacked folder itself."""
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    inside = os.path.basename(os.path.normpath(root)) == cls.base_folder
    return cls, os.path.dirname(os.path.normpath(root)) if inside else root


def download_cifar(name, root):
    """Fetch CIFAR-10/100 into root with torchvision (nothing to do when the files are there)."""
    if name not in ("cifar10", "cifar100"):
        raise UserError(f"download=True fetches cifar10 or cifar100, not {name}: leave it out and pass --data_dir")
    cls, root = cifar(name, root)
    if os.path.isfile(root):
        check_data_dir(root, cls.base_folder)
    try:
        cls(root, train=True, download=True)
    except (OSError, RuntimeError) as e:   # no network (URLError is an OSError), a bad archive
        raise UserError(f"cannot download {name} into {root}: {e} (no network? unpack {cls.filename} there "
                        f"yourself and leave out --download)") from None


def cifar_problem(cls, root):
    """What is wrong with a CIFAR folder torchvision refused: the files missing, else those whose MD5
    differs from the official one (a modified or re-pickled copy)."""
    import hashlib
    folder = os.path.join(root, cls.base_folder)
    listed = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
    missing = [f for f, _ in listed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        return (f"{folder} is missing or incomplete (no {', '.join(missing)}): unpack {cls.filename} into {root}, "
                f"or pass --download=True")
    differ = [f for f, md5 in listed if hashlib.md5(open(os.path.join(folder, f), "rb").read()).hexdigest() != md5]
    return (f"{folder}: {', '.join(differ) or 'the files'} differ from the official CIFAR files (MD5 checksum "
            f"mismatch: modified, re-pickled or damaged copies): unpack the official {cls.filename} there again, "
            f"or pass --download=True")


def load_cifar(name, root):
    """CIFAR-10/100 from torchvision's files (<root>/cifar-10-batches-py or <root>/cifar-100-python,
    the python version's pickled batches), normalised with the training set's channel statistics."""
    cls, root = cifar(name, root)
    check_data_dir(root, cls.base_folder, ", or --download=True to fetch it there")
    try:
        train, val = cls(root, train=True), cls(root, train=False)
    except RuntimeError:   # torchvision: "Dataset not found or corrupted" (a missing file or another checksum)
        raise UserError(cifar_problem(cls, root)) from None
    tensors = lambda ds: (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    (xtr, ytr), (xva, yva) = tensors(train), tensors(val)
    return image_tensors(xtr, ytr, xva, yva, len(train.classes), *channel_stats(xtr))


class EvalResize:
    """ImageNet's evaluation resize (shorter side to size * 256/224, then the center size x size),
    skipped for an image that already is size x size (a validation set stored at that size)."""

    def __init__(self, size):
        from torchvision import transforms as T
        self.size, self.resize = size, T.Compose([T.Resize(size * 256 // 224), T.CenterCrop(size)])

    def __call__(self, img):
        return img if img.size == (self.size, self.size) else self.resize(img)


def load_image(path):
    """ImageFolder's loader (RGB, as its default): a corrupt or unreadable image names itself in one line."""
    from PIL import Image
    try:
        with open(path, "rb") as f, Image.open(f) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path} is not a readable image ({type(e).__name__}: {e}): remove or replace it") from None


def decode_images(folder, workers):
    """Every image of an ImageFolder as one uint8 tensor [N, 3, H, W] (they must share a size), and the labels."""
    from torch.utils.data import DataLoader
    from torchvision.transforms import PILToTensor
    folder.transform = PILToTensor()
    x, i = None, 0
    for batch in DataLoader(folder, batch_size=256, num_workers=workers, collate_fn=list):
        for img, _ in batch:
            if x is None:
                x = torch.empty(len(folder), *img.shape, dtype=torch.uint8)
            if img.shape != x.shape[1:]:
                raise UserError(f"{folder.samples[i][0]} is {img.shape[2]}x{img.shape[1]} px, {folder.samples[0][0]} "
                                f"{x.shape[3]}x{x.shape[2]}: the small-image recipe needs images of one size (resize "
                                f"them, or use --augment=imagenet --image_size=<crop>)")
            x[i], i = img, i + 1
    return x, torch.tensor(folder.targets)


def open_image_folder(root, cfg):
    """An ImageFolder tree <root>/{train,val}/<class>/<image> (val/ may be test/), with the recipe
    for its image size: up to SMALL_IMAGE px the small-image one (decoded once into tensors),
    above it ImageNet's (RandomResizedCrop + flip; the evaluation resize of EvalResize)."""
    check_data_dir(root, "train/ and val/ class folders")
    held_out = next((s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
    if not os.path.isdir(os.path.join(root, "train")) or held_out is None:
        raise UserError(f"{root} has no {'val' if os.path.isdir(os.path.join(root, 'train')) else 'train'}/ folder: "
                        f"{cfg['dataset']} needs the ImageFolder layout <data_dir>/train/<class>/<image> and "
                        f"<data_dir>/val/<class>/<image> (or test/)")
    from PIL import Image
    from torchvision import datasets, transforms as T      # pure-Python parts of torchvision only
    try:
        train, val = (datasets.ImageFolder(os.path.join(root, s), loader=load_image) for s in ("train", held_out))
    except FileNotFoundError as e:   # no class folders, or a class folder without images
        raise UserError(f"{root}: {e}") from None
    if train.classes != val.classes:
        raise UserError(f"{root}: train/ and {held_out}/ hold different class folders")
    workers = loader_workers(cfg["num_workers"])
    recipe = cfg["augment"]
    if recipe == "auto":
        try:
            with Image.open(train.samples[0][0]) as im:     # reads the header only
                recipe = "small" if max(im.size) <= SMALL_IMAGE else "imagenet"
        except OSError as e:
            raise UserError(f"{train.samples[0][0]} is not a readable image ({type(e).__name__}): remove or replace "
                            f"it") from None
    if recipe == "small":
        (xtr, ytr), (xva, yva) = decode_images(train, workers), decode_images(val, workers)
        if xva.shape[1:] != xtr.shape[1:]:
            raise UserError(f"{root}: {held_out}/ images are {xva.shape[3]}x{xva.shape[2]} px, train/ images "
                            f"{xtr.shape[3]}x{xtr.shape[2]}: the small-image recipe evaluates at the training size")
        return image_tensors(xtr, ytr, xva, yva, len(train.classes), *channel_stats(xtr))
    size, norm = cfg["image_size"], T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train.transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val.transform = T.Compose([EvalResize(size), T.ToTensor(), norm])
    return dict(kind="folder", train=train, val=val, num_classes=len(train.classes), in_channels=3, size=size,
                augment=True, workers=workers)


def make_synthetic(n, size, classes=10, channels=3, seed=0):
    """Learnable toy images: a smooth random template per class plus noise (tests only)."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes, channels, 4, 4, generator=g), size=(size, size), mode="bilinear")
    def split(m):
        y = torch.randint(0, classes, (m,), generator=g)
        return templates[y] + 0.5 * torch.randn(m, channels, size, size, generator=g), y
    return (*split(n), *split(n // 2))


def gpu_augment(x, gen, pad=4, fill=0.0):
    """Random crop with padding plus horizontal flip, per image, on x's device. fill: the padding's
    value, one number or one per channel (a zero pixel after normalisation: -mean / std)."""
    B, C, H, W = x.shape
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    xp = fill.expand(B, C, H + 2 * pad, W + 2 * pad).clone()
    xp[:, :, pad:pad + H, pad:pad + W] = x
    oy = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=gen)
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, :, None]        # [B, H, 1]
    cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, :]        # [B, 1, W]
    out = xp[torch.arange(B, device=x.device)[:, None, None], :, rows, cols]    # [B, H, W, C]
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(B, device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def load_data(cfg):
    """-> dict(kind='tensor'|'folder', train, val, num_classes, in_channels, size, augment, and
    fill (tensor: the padding value) or workers (folder: DataLoader workers per rank))."""
    name = cfg["dataset"]
    if name not in DATASETS:
        raise UserError(f"dataset={name!r}: use {', '.join(DATASETS)}")
    if cfg["augment"] not in ("auto", "small", "imagenet"):
        raise UserError(f"augment={cfg['augment']!r}: use auto, small or imagenet")
    if cfg["augment"] != "auto" and name not in ("imagenet", "folder"):
        raise UserError(f"augment={cfg['augment']!r} chooses the recipe of an image folder: {name} has its own "
                        f"(leave augment out)")
    root = dataset_dir(name, cfg["data_dir"])
    if name == "fashion_mnist" and not cfg["data_dir"] and not os.path.isdir(root) and os.path.isdir(DEBIAN_FMNIST):
        root = DEBIAN_FMNIST
    if name == "synthetic":
        xtr, ytr, xva, yva = make_synthetic(cfg["n_synthetic"], cfg["image_size"], seed=cfg["seed"])
        return dict(kind="tensor", train=(xtr, ytr), val=(xva, yva), num_classes=10, in_channels=3,
                    size=cfg["image_size"], augment=False, fill=0.0)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root)
    if name == "fashion_mnist":
        check_data_dir(root, "the four Fashion-MNIST idx files")
        return load_fashion_mnist(root)
    return open_image_folder(root, cfg)


def n_items(ds):
    return len(ds[1]) if isinstance(ds, tuple) else len(ds)


def epoch_order(n, B, world, rank, epoch, seed):
    """This rank's sample indices for one epoch, batch after batch: a fixed permutation of
    (seed, epoch), cut into global batches of B, each split evenly over the ranks."""
    spe = n // B
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))[:spe * B]
    return perm.view(spe, world, B // world)[:, rank].reshape(-1)


def train_batches(data, cfg, start, max_iters, world, rank, dev):
    """(x, y) on dev for steps start..max_iters-1; a function of (seed, step, rank) only, so a
    resumed run sees the same batches (image folders: the same images; crops come from worker RNG)."""
    n, B = n_items(data["train"]), cfg["batch_size"]
    spe, Bl = n // B, B // world
    step = start
    while step < max_iters:
        epoch, k = divmod(step, spe)
        order = epoch_order(n, B, world, rank, epoch, cfg["seed"])
        if data["kind"] == "tensor":
            xs, ys = data["train"]
            order = order.to(dev)
            gen = torch.Generator(device=dev)
            for j in range(k, spe):
                if step >= max_iters:
                    return
                idx = order[j * Bl:(j + 1) * Bl]
                x, y = xs[idx], ys[idx]
                if data["augment"]:
                    gen.manual_seed(int(np.random.SeedSequence([cfg["seed"], step, rank]).generate_state(1)[0]))
                    x = gpu_augment(x, gen, fill=data["fill"])
                yield x, y
                step += 1
        else:
            from torch.utils.data import DataLoader
            loader = DataLoader(data["train"], batch_size=Bl, sampler=order[k * Bl:].tolist(), drop_last=True,
                                num_workers=data["workers"], pin_memory=dev.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg["seed"] + 7919 * step + rank))
            for x, y in loader:
                if step >= max_iters:
                    return
                yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                step += 1


def val_batches(data, cfg, world, rank, dev):
    """This rank's share of the whole validation set (every image exactly once over the ranks)."""
    Bl = cfg["eval_batch_size"]
    if data["kind"] == "tensor":
        xs, ys = (t[rank::world].to(dev) for t in data["val"])   # no-ops when it lives on the GPU
        for i in range(0, len(xs), Bl):
            yield xs[i:i + Bl], ys[i:i + Bl]
    else:
        from torch.utils.data import DataLoader
        idx = list(range(rank, n_items(data["val"]), world))
        for x, y in DataLoader(data["val"], batch_size=Bl, sampler=idx, num_workers=data["workers"],
                               pin_memory=dev.type == "cuda"):
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)


@torch.no_grad()
def evaluate(model, data, cfg, dev, ctx, world=1, rank=0):
    """(top-1 accuracy, mean CE) over the validation set, summed over DDP ranks."""
    was = model.training
    model.eval()
    tot, n = torch.zeros(2, device=dev, dtype=torch.float64), 0    # correct, loss sum on the device; count on the host
    for x, y in val_batches(data, cfg, world, rank, dev):
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx:
            logits = model(x).float()
        tot += torch.stack([(logits.argmax(1) == y).sum().double(), F.cross_entropy(logits, y, reduction="sum").double()])
        n += len(y)
    tot = torch.cat([tot, torch.tensor([float(n)], dtype=torch.float64, device=dev)])
    if world > 1:
        torch.distributed.all_reduce(tot)                              # one tensor: correct, loss sum, count
    model.train(was)
    correct, loss_sum, count = tot.tolist()
    return correct / count, loss_sum / count


# ---- block importance -------------------------------------------------------------------------
def block_importance(model, data, cfg, dev, ctx, world=1, rank=0, log=print):
    """Top-1 drop on the validation set when each block's residual branch is removed."""
    keep = model.passthrough
    try:
        base, _ = evaluate(model, data, cfg, dev, ctx, world, rank)
        accs = []
        for i in range(len(model.blocks)):
            model.set_passthrough([i])
            accs.append(evaluate(model, data, cfg, dev, ctx, world, rank)[0])
            log(f"importance block {i:2d}: top-1 {100 * accs[-1]:6.2f}%  drop {100 * (base - accs[-1]):6.2f} pts")
    finally:                  # an interrupted analysis must not leave a block ablated
        model.set_passthrough(keep)
    return base, accs


def write_importance(out, base, accs, log=print):
    """importance.json, tied to the checkpoint it measured (fanin.py ignores it for other weights)."""
    names = [f"layer.{i}" for i in range(len(accs))]
    res = {"metric": "top1_drop", "baseline": base, "importance": [base - a for a in accs],
           "accuracy": accs, "layer_names": names,
           "weights": rundir.checkpoint_id(rundir.read_checkpoint(out, kind="resnet"))}
    if os.path.isfile(rundir.file(out, rundir.GRAD_DUMP)):
        res["share"] = [float(s) for s in rundir.read_grad_dump(out)["share"]]
        rho, p = spearman(res["share"], res["importance"])
        res["spearman"] = {"rho": float(rho), "p": float(p)}
        log(f"Spearman(share, top-1 drop) rho={rho:.3f} p={p:.3g}  (paper, ResNet-50 on ImageNet: 0.83)")
    rundir.write_importance(out, res)
    log(f"wrote {rundir.file(out, rundir.IMPORTANCE)}: baseline top-1 {100 * base:.2f}%, drops (pts) "
        + " ".join(f"{100 * d:.2f}" for d in res["importance"]))
    return res


# ---- main -------------------------------------------------------------------------------------
def read_run(cfg):
    """The checkpoint that --analyse or --init_from=resume continues from (None for a new run);
    --analyse takes the run's own settings, except where the data lives and how to evaluate."""
    check_init_from(cfg["init_from"])
    if not (cfg["analyse"] or cfg["init_from"] == "resume"):
        return None, cfg
    if not rundir.has_checkpoint(cfg["out_dir"]):
        raise UserError(f"no checkpoint at {rundir.file(cfg['out_dir'], rundir.CKPT)}: train first (or fix --out_dir)")
    ckpt = rundir.read_checkpoint(cfg["out_dir"], kind="resnet")
    if not cfg["analyse"]:   # recorded with the resume in the log (train())
        ckpt["changes"] = check_resume(ckpt["train_config"], cfg, FREE_ON_RESUME, cfg["allow_changes"])
    if cfg["analyse"]:
        keep = ("out_dir", "device", "dtype", "eval_batch_size", "num_workers", "download", "analyse")
        cfg = (defaults | ckpt["train_config"] | {k: cfg[k] for k in keep}    # defaults: keys added since the run
               | ({"data_dir": cfg["data_dir"]} if cfg["data_dir"] else {}))
    return ckpt, cfg


def build_model(cfg, data, ckpt, dev):
    """ResNet-50 for the data (its classes, channels, image size), restored from ckpt if given, on dev."""
    small = cfg["stem"] == "small" or (cfg["stem"] == "auto" and data["size"] <= SMALL_IMAGE)
    torch.manual_seed(cfg["seed"])
    model = ResNet50(data["num_classes"], data["in_channels"], small, cfg["width"])
    if data["size"] < model.min_image_size():
        raise UserError(f"{cfg['dataset']} images are {data['size']}x{data['size']}, smaller than the "
                        f"{model.min_image_size()} px the {'small' if small else 'imagenet'} stem needs: "
                        + "use --stem=small" + (" or a larger --image_size" if data["kind"] == "folder"
                                                 or cfg["dataset"] == "synthetic" else ""))
    if ckpt is not None:
        _, have = rundir.read_model_config(cfg["out_dir"])
        if have != model.config:
            raise UserError(f"checkpoint model {have} differs from the requested {model.config}")
        check_state(ckpt["model"], rundir.file(cfg["out_dir"], rundir.CKPT), fix="restore it from a good copy")
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
        if data["kind"] == "tensor":   # small images live on the GPU (CIFAR: 740 MB as floats, val included)
            data["train"], data["val"] = (tuple(t.to(dev) for t in data[k]) for k in ("train", "val"))
    return model


def restore(ckpt, opt, dump, dev, log, out):
    """Optimizer, dump and RNG state of the checkpoint resumed from; returns (step, best top-1)."""
    opt.load_state_dict(ckpt["optimizer"])
    it = ckpt["iter_num"]
    dump.load_state_dict(ckpt["grad_dump"], before_step=it)
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    if dev.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in ckpt["changes"].items()) or "settings unchanged"
    log(f"resumed from {rundir.file(out, rundir.CKPT)} at step {it}: {changes}")
    return it, ckpt["best_val_acc"]


def schedule(cfg, n_train):
    """Table 5's schedule in steps: (steps per epoch = n_train // batch_size, total steps, warm-up
    steps); one-line errors for a run that cannot follow it."""
    B = cfg["batch_size"]
    spe = n_train // B
    if spe < 1:
        raise UserError(f"{n_train} training images are fewer than batch_size={B}: lower --batch_size (at most "
                        f"{n_train}) or give more images")
    max_iters, warmup = cfg["epochs"] * spe, max(1, round(cfg["warmup_epochs"] * spe))
    if warmup >= max_iters:
        raise UserError(f"warmup_epochs={cfg['warmup_epochs']} ({warmup} steps) is not shorter than the run "
                        f"(epochs={cfg['epochs']}, {max_iters} steps): the learning rate would never reach its peak; "
                        f"give a shorter warm-up (Table 5's share, 5 of 30 epochs: "
                        f"--warmup_epochs={cfg['epochs'] / 6:.2g})")
    return spe, max_iters, warmup


def train(cfg, model, data, ckpt, d, ctx, log, compiled, sched):
    """sched (schedule()) in steps with a per-step cosine, the gradient dump, an eval every epoch
    and a checkpoint every epoch (or ckpt_interval). Returns the step reached."""
    dev, out, B = torch.device(d.device), cfg["out_dir"], cfg["batch_size"]
    spe, max_iters, warmup = sched
    stop = min(max_iters, cfg["stop_iter"] or max_iters)
    opt = adamw(model.parameters(), cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), cfg["weight_decay"],
                fused=dev.type == "cuda")
    step = GradStep(model.param_groups_by_layer(), opt)   # no clipping (Table 5)
    dump = rundir.GradNormDump(step.norms.names, rundir.file(out, rundir.GRAD_DUMP))
    it, best = restore(ckpt, opt, dump, dev, log, out) if ckpt is not None else (0, 0.0)
    raw = model
    if compiled:
        model = torch.compile(model)
    if d.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    guard = FiniteGuard()

    def save():   # on every rank alike (they hold the same weights), so a diverged model is never saved
        guard.check(rundir.kept(out))
        check_weights(raw, it, rundir.kept(out))

        def write():
            dump.flush()
            rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                   "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
            rundir.save_checkpoint(out, "resnet", raw.state_dict(), cfg, it, optimizer=opt.state_dict(),
                                   best_val_acc=best, grad_dump=dump.state_dict(), rng=rng)
        on_master(d, write)   # a full disk stops every rank with the same line

    log(f"training {max_iters} steps ({cfg['epochs']} epochs x {spe}), warm-up {warmup}, global batch {B}")
    model.train()
    t0, t_start, n_steps, loss_acc = time.time(), time.time(), 0, torch.zeros((), device=dev)
    for x, y in train_batches(data, cfg, it, stop, d.world, d.rank, dev):
        lr = cosine_lr(it, cfg["learning_rate"], cfg["min_lr"], warmup, max_iters)
        set_lr(opt, lr)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()                                   # DDP all-reduces here
        norms, _, _ = step()
        if d.master:
            dump.record(it, norms)                        # global gradient, no host sync
        guard.watch(it, loss)
        loss_acc += loss.detach()
        it, n_steps = it + 1, n_steps + 1
        end_epoch = it % spe == 0
        if it % cfg["log_interval"] == 0 or end_epoch or it == stop:   # one host sync per interval
            guard.check(rundir.kept(out))
            dt = time.time() - t0
            log(f"step {it:6d}/{max_iters} | epoch {it / spe:5.2f} | loss {loss_acc.item() / n_steps:.4f} | "
                f"lr {lr:.2e} | {n_steps * B / dt:8.0f} img/s | {1000 * dt / n_steps:6.1f} ms/step")
            if d.master:
                dump.flush()
            t0, n_steps, loss_acc = time.time(), 0, torch.zeros((), device=dev)
        if end_epoch or it == stop:
            acc, vloss = evaluate(raw, data, cfg, dev, ctx, d.world, d.rank)
            best = max(best, acc)
            log(f"eval epoch {it / spe:5.2f} | val top-1 {100 * acc:.2f}% | val loss {vloss:.4f} | "
                f"elapsed {time.time() - t_start:.0f}s")
        if end_epoch or it == stop or (cfg["ckpt_interval"] and it % cfg["ckpt_interval"] == 0):
            save()
            t0 = time.time()                  # keep eval and checkpoint time out of img/s
    return it


def main(argv):
    with rundir.RunStart() as start:   # one writer per run directory; a failed start leaves nothing behind
        return _main(argv, start)


def _main(argv, start):
    cfg = read_config(argv, defaults, help=(__doc__, [("resnet.py", defaults, __file__)]))
    d = setup_distributed(cfg["device"])
    on_master(d, lambda: start.claim(cfg["out_dir"]))
    dev = torch.device(d.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True     # fixed shapes: let cuDNN pick the fastest conv kernels
    dt = cfg["dtype"] if cfg["dtype"] != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    ctx = autocast_for(dev.type, dt)
    compiled = use_compile(cfg["compile"], dev.type)
    if cfg["batch_size"] % d.world:
        raise UserError(f"batch_size={cfg['batch_size']} does not divide over {d.world} ranks")
    if cfg["stem"] not in ("auto", "small", "imagenet"):
        raise UserError(f"stem={cfg['stem']!r}: use auto, small or imagenet")
    check_optimizer_settings(cfg)
    for k in ("epochs", "batch_size", "log_interval", "eval_batch_size", "width"):
        if cfg[k] < 1:
            raise UserError(f"{k}={cfg[k]}: must be >= 1")
    for k in ("warmup_epochs", "num_workers"):
        if cfg[k] < 0:
            raise UserError(f"{k}={cfg[k]}: must be >= 0")
    ckpt, cfg = read_run(cfg)
    if cfg["download"]:   # rank 0 fetches, the others wait for it (on_master broadcasts its outcome)
        on_master(d, lambda: download_cifar(cfg["dataset"], dataset_dir(cfg["dataset"], cfg["data_dir"])))
    data = load_data(cfg)
    sched = None if cfg["analyse"] else schedule(cfg, n_items(data["train"]))   # before anything is written
    model = build_model(cfg, data, ckpt, dev)
    out = cfg["out_dir"]
    if ckpt is None:   # a new run: never into a folder that holds another one (unless overwrite)
        rundir.start_run(out, "resnet", model.config, cfg["overwrite"], write=d.master,
                         identity=rundir.run_identity("resnet", model.config, cfg, rundir.run_data_id("resnet", cfg)))
    elif d.master and not cfg["analyse"]:   # checked in build_model: a run of an earlier version gets the file
        rundir.write_model_config(out, "resnet", model.config)
    log = rundir.Log(out, d.master)
    log(f"ResNet-50: {sum(p.numel() for p in model.parameters()):,} params, {data['num_classes']} classes, "
        f"{data['in_channels']} ch, {'small' if model.config['small_stem'] else 'imagenet'} stem, width {cfg['width']}, "
        f"{n_items(data['train'])} train / {n_items(data['val'])} val images of {data['size']} px, "
        f"{d.world} x {dev}, {dt}, compile={compiled}")
    if data.get("workers", cfg["num_workers"]) < cfg["num_workers"]:
        log(f"DataLoader workers: {data['workers']} per rank (num_workers={cfg['num_workers']} is more than this "
            f"rank's share of the CPU cores)")
    start.started()
    it = None if cfg["analyse"] else train(cfg, model, data, ckpt, d, ctx, log, compiled, sched)
    if it is not None and it < sched[1]:
        log(f"stopped at step {it} of {sched[1]}: continue with --init_from=resume; python fanin.py {out} analyses "
            f"it, and python resnet.py --out_dir={out} --analyse=True measures these weights' importance")
    if cfg["analyse"] or (it == sched[1] and cfg["importance"]):
        base, accs = block_importance(model, data, cfg, dev, ctx, d.world, d.rank, log)
        if d.master:
            write_importance(out, base, accs, log)
    log.close()
    teardown(d)


if __name__ == "__main__":
    cli(main)
