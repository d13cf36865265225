"""Encoder effort: per-image latent refinement before coding.

The analysis transform g_a is amortized: one network maps every image to a latent,
and the latent it gives is some way from the one that minimises the rate-distortion
cost for the image at hand.  At effort > 0 the encoder closes part of that gap with
gradient steps on the gained latent y (Campos et al., *Content Adaptive Optimization
for Neural Image Compression*, 2019; Yang, Bamler & Mandt, *Improving Inference for
Neural Image Compression*, NeurIPS 2020)::

    min_y  bpp(y + u | psi)  +  lambda(level) * 255^2 * MSE(x, g_s(round_mu(y) * inv_gain))

The rate is the Gaussian conditional's, evaluated under uniform noise u (the
training relaxation); the distortion goes through straight-through rounding around
the entropy model's means, i.e. through the reconstruction the decoder will make.
z is fixed to the hyper-latent of the unrefined y, so psi (the hyperprior's
features) is a constant of the problem.  The refined y is then coded by the usual
deterministic path: files stay readable by any decoder of this format, and nothing
about the decoder changes.  Normalised gradient descent with a cosine step-size decay
(see LEARNING_RATE), with a fixed noise seed.  On the CPU g_s runs on every thread the
codec has and the entropy model, the costs and the steps on one, so a fitted file is the
same bytes with any thread count (the fit only chooses the latent; it does not have to be
reproducible on another machine); on a GPU the whole fit runs there.  g_s runs under bf16
autocast where the device multiplies bf16 natively (``native_bf16``): g_s about 2x and
the fit about 1.5x faster on such a CPU, for the same gain.  The rate terms stay in fp32.

From effort SGA_FROM up the rounding is relaxed by stochastic Gumbel annealing instead
(Yang, Bamler & Mandt's SGA): rate and distortion are both taken at a soft, random
rounding of y - mu that hardens as its temperature falls, and Adam moves y.  Where the
straight-through fit stops gaining (kodim23 at quality 0: 4 758 B at 31.30 dB after 48
steps, 4 786 B at 31.34 dB after 192), the annealed one goes on (4 702 B at 31.49 dB after
144): on kodim01/23 over qualities 0-45, 32 annealed steps
gave -10.2 % BD-rate against effort 0, 48 straight-through steps -7.6 %, and 96 annealed
steps -12.4 %.  The gain keeps growing with the steps (see SGA_LR), hence the doubling from
effort 7 (48 steps) to effort 9 (192).
"""

from __future__ import annotations

import functools
import math
import weakref

__all__ = ["DEFAULT_EFFORT_PIXELS", "DEFAULT_EFFORTS", "DEFAULT_ROI_WEIGHT", "EFFORT_MAX_PIXELS", "EFFORT_STEPS",
           "MAX_EFFORT", "PERCEPTUAL_FIT_QUALITY", "ROI_MIN_EFFORT", "SGA_FROM", "native_bf16", "refine_latent"]

#: Gradient steps per effort level 0..9 (effort 0: the analysis transform's latent as is).
EFFORT_STEPS = (0, 2, 4, 6, 8, 12, 16, 48, 96, 192)
MAX_EFFORT = len(EFFORT_STEPS) - 1
# The default effort of each tuning.  With --tune fidelity, effort 1 (two steps) gains most of what
# the straight-through efforts gain, for a few seconds per Kodak image (see the effort table in the
# README).  Perceptual files stay at effort 0: there the fit changes LPIPS by -0.007 to +0.001 (kodim04,
# 13, 19 and 23 at effort 3, qualities 25, 50 and 70), too little for the time.
# Above DEFAULT_EFFORT_PIXELS the default is 0 in both: on a 3000x2000 photo effort 1 took 3x (quality 40)
# to 6x (quality 75) the time of effort 0, over a minute on 2 cores.
DEFAULT_EFFORTS = {"fidelity": 1, "perceptual": 0}
DEFAULT_EFFORT_PIXELS = 4_000_000
# Files made for the perceptual decoder are fitted from this quality up (codec.PERCEPTUAL_FIT_FROM).
PERCEPTUAL_FIT_QUALITY = 16.5
# Regions of interest: the squared error inside counts DEFAULT_ROI_WEIGHT times that
# outside, in the latent's fit (at effort ROI_MIN_EFFORT or more) and in the
# refinement layer's choice of levels.  At quality 75 on the four masks of examples/roi/,
# 32 gave the region +2.1 to +4.0 dB over the unmasked file of the same size (16: +1.95 to
# +3.8) for at most 0.5 dB less outside than 16.
DEFAULT_ROI_WEIGHT = 32.0
ROI_MIN_EFFORT = 2
# g_s's activations for the backward pass take about 1 GB per megapixel, so on images of
# more than one tile the fit takes the distortion tile by tile (FIT_TILE pixels a side and
# FIT_MARGIN around each, in latent positions x 16, as the decoder's g_s tiles), each tile's
# forward and backward pass at once.  The entropy model keeps only each chunk's inputs and
# outputs for its backward pass (about 0.2 GB per megapixel), and on a latent the coder splits
# into bands it runs band by band as the coder does (see ``_banded``).  3000x2000 at quality 40,
# effort 1: 38 s and 2.3 GB on 2 cores.  Larger images than EFFORT_MAX_PIXELS are coded at effort 0.
FIT_TILE = 1024
FIT_MARGIN = 64
EFFORT_MAX_PIXELS = 16_000_000
# Gradient descent with the gradient scaled to unit RMS, so that a step moves a typical
# latent element by LEARNING_RATE (cosine decay to 0 over the run) and the elements with
# the largest gradients (those near a rounding boundary that matters) by more.  On
# kodim01/13/23 at quality 0 and 50, 6 steps: 0.05 gained about twice what Adam did at
# its best step size (0.02; 0.06 and 0.15 overshot), and 0.12 overshot.
LEARNING_RATE = 0.05
# Stochastic Gumbel annealing (efforts SGA_FROM and up): Adam's step size, the starting
# temperature, its decay over the run (exp(-SGA_DECAY) of the start at the end), and how
# often the rounded latent is scored.
# On 384x256 crops of kodim01/04/13/23 at qualities 0 and 40 (the latent alone), the cost
# bits + lambda x squared error of the coded file fell by 5.34 % at these settings with 96
# steps and by 6.11 % with 192.  With 96 steps, each change tried gained less: Adam's step
# 0.005 or 0.02 (5.21, 4.91 %), a start temperature of 1.0 with a decay of 4 (5.21 %), a
# decay of 5 (5.20 %), 8 of the steps spent straight-through before or after the annealing
# (5.13, 5.14 %), z re-derived from the fitted y (4.41 %); fitting z along with y, its rate
# from the hyperprior's tables, gained the same (5.36 %) and is not done.
SGA_FROM = 7
SGA_LR = 0.01
SGA_TAU = 0.5
SGA_DECAY = 3.0
SGA_CHECK = 8
_SCALE_BOUND = 0.11
_LIKELIHOOD_BOUND = 1e-9


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda") multiplies bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # oneDNN's own probe also says yes on AVX-512 CPUs without bf16 instructions, where it emulates them
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return device_type == "cpu" and any(probe is not None and bool(probe()) for probe in probes)


def _bits(residual, sigma):
    """-log2 of the probability of unit bins around ``residual`` under N(0, sigma)."""
    import torch

    s = sigma.clamp(min=_SCALE_BOUND)
    upper = torch.special.ndtr((0.5 - residual.abs()) / s)
    lower = torch.special.ndtr((-0.5 - residual.abs()) / s)
    return -torch.log2((upper - lower).clamp(min=_LIKELIHOOD_BOUND)).sum()


def refine_latent(model, x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor, level: float, steps: int,
                  height: int, width: int, weight: torch.Tensor | None = None, lr: float | None = None,
                  seed: int = 0, dct_step: float | None = None, bf16: bool | None = None,
                  relax: str = "ste") -> torch.Tensor:
    """``steps`` gradient steps on the gained latent ``y`` (1, M, h, w) of the padded image ``x`` (1, 3, H, W).

    ``x`` is in 0..1 on the codec's device and layout; ``psi`` are the hyperprior
    features of the fixed z; ``height`` x ``width`` is the image inside the padding,
    over which distortion and rate are counted.  ``weight`` (height, width), mean 1,
    weighs the squared error of each pixel (regions of interest).  ``bf16`` runs g_s
    under bf16 autocast (default: where the device has it natively).  ``relax`` is how
    rounding is relaxed: "ste" (straight-through rounding, rate under uniform noise,
    normalised gradient steps) or "sga" (stochastic Gumbel annealing, see
    :func:`_fit_sga`).  Returns the refined y (CPU, fp32).
    """
    import torch

    if steps <= 0:
        return y
    device = x.device
    # On a GPU the whole fit runs there (a copy of the entropy model with it); on the CPU only g_s
    # takes every thread and the rest stays on one (see below).
    on_gpu = device.type != "cpu"
    entropy = _device_entropy(model, device) if on_gpu else model.entropy
    if bf16 is None:
        bf16 = native_bf16(device.type)
    _, inv_gain = model.gains(level)
    lam = model.lmbda(level) * 255**2
    pixels = height * width
    lr = lr or LEARNING_RATE
    w = torch.zeros(1, 1, *x.shape[-2:], device=device)
    w[..., :height, :width] = x.shape[-1] * x.shape[-2] / pixels  # mean over the image, padding ignored
    if weight is not None:
        w[..., :height, :width] *= weight.to(device)
    weight = w
    dct = _DctCost(x, dct_step, weight, height, width) if dct_step else None
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU on any device: the same numbers
    fit = device if on_gpu else torch.device("cpu")
    with torch.no_grad(), _threads(1):  # z is fixed: psi's part is taken once, on one thread as the fit below
        psi = entropy.hyper_terms(psi.detach().to(fit))
    var = y.detach().to(fit).clone().requires_grad_(True)
    layout, g_in = x_layout(x), inv_gain.to(fit)

    def synthesis(y_hat):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model.g_s((y_hat * g_in).to(device, memory_format=layout)).float()

    threads = torch.get_num_threads()
    tiles = _fit_tiles(*var.shape[-2:], FIT_TILE // 16, FIT_MARGIN // 16)
    if tiles is not None:  # a large image: the entropy model keeps less for its backward pass
        chunks = entropy.chunks
        entropy = functools.partial(entropy, checkpoint=True)
        if not on_gpu:
            from .codec import latent_bands  # imported here: the codec imports this module

            bands = latent_bands(*var.shape[-2:])
            if bands is not None and len(bands) > 1:
                entropy = _banded(entropy, chunks, bands, threads)

    def distortion(y_hat):
        """The distortion term of what the decoder makes of the (rounded or relaxed) latent."""
        if tiles is None:
            x_bar = _threaded(y_hat, synthesis, threads)
            return lam * ((x_bar - x).square() * weight).mean() if dct is None else dct(x_bar) / pixels
        return _tiled_loss(y_hat, tile_distortion, tiles, threads)

    def tile_distortion(y_part, tile):
        """The distortion term over one tile's centre, from the latent of the tile and its margin."""
        (a0, b0), (i0, i1, j0, j1) = tile[1], tile[0]
        x_bar = synthesis(y_part)[..., (i0 - a0) * 16 : (i1 - a0) * 16, (j0 - b0) * 16 : (j1 - b0) * 16]
        rows, cols = slice(i0 * 16, i1 * 16), slice(j0 * 16, j1 * 16)
        if dct is not None:
            return dct(x_bar, rows, cols) / pixels
        return lam * ((x_bar - x[..., rows, cols]).square() * weight[..., rows, cols]).sum() / x.numel()

    # Only g_s runs on every thread (its convolutions give the same sums on any number of
    # threads); the entropy model, the costs and the steps run on one (the entropy model's
    # 1x1 convolutions split their sums by thread), so a fitted file is the same bytes
    # whatever --threads or -j is.
    with _threads(1):
        if relax == "sga":
            best = _fit_sga(entropy, y, var, psi, pixels, distortion, steps, gen)
        else:
            best = _fit_ste(entropy, y, var, psi, pixels, distortion, steps, gen, lr)
    return best.to("cpu", torch.float32)


_DEVICE_ENTROPY = weakref.WeakKeyDictionary()


def _device_entropy(model, device):
    """A copy of ``model.entropy`` on ``device`` for the fit, made once per model and device (whose
    weights are taken as fixed); the codec's own stays on the CPU, where the symbols are coded."""
    import copy

    copies = _DEVICE_ENTROPY.setdefault(model, {})
    if device not in copies:
        copies[device] = copy.deepcopy(model.entropy).to(device).requires_grad_(False)
    return copies[device]


def _fit_ste(entropy, y, var, psi, pixels, distortion, steps, gen, lr):
    """Straight-through fit: rate under uniform noise, distortion of the rounded latent, normalised
    gradient steps of ``lr`` per RMS gradient with a cosine decay; the best rounded latent is kept."""
    import torch

    best, best_loss = y, math.inf
    with torch.enable_grad():
        for i in range(steps + 1):
            with torch.set_grad_enabled(i < steps):  # the last pass is only scored
                y_hat, mu, sigma = entropy(var, psi)
                noise = torch.rand(var.shape, generator=gen).to(var.device) - 0.5
                rate = _bits(var + noise - mu, sigma) / pixels
                shown = distortion(y_hat)
                loss = rate + shown
            # the step whose rounded latent scores best is kept (the loss uses the rounded
            # latent for distortion; its rate term is a noisy estimate of the coded rate)
            with torch.no_grad():
                exact = _bits(y_hat - mu, sigma) / pixels + shown
                if exact.item() < best_loss:
                    best, best_loss = var.detach().clone(), exact.item()
            if i == steps:
                break
            var.grad = None
            loss.backward()
            with torch.no_grad():  # a step of lr per RMS gradient, lr decaying on a cosine
                var.grad /= var.grad.square().mean().sqrt().clamp(min=1e-12)
                var.add_(var.grad, alpha=-lr * 0.5 * (1 + math.cos(math.pi * i / steps)))
    return best


def _fit_tiles(h: int, w: int, tile: int, margin: int) -> list | None:
    """The tiles of an (h, w) latent for the fit's distortion: ((i0, i1, j0, j1) centre, (a0, b0) corner of
    the centre with its margin, (a1, b1) far corner); None where the latent is one tile."""
    if h <= tile + 2 * margin and w <= tile + 2 * margin:
        return None
    out = []
    for i0 in range(0, h, tile):
        for j0 in range(0, w, tile):
            i1, j1 = min(i0 + tile, h), min(j0 + tile, w)
            out.append(((i0, i1, j0, j1), (max(i0 - margin, 0), max(j0 - margin, 0)),
                        (min(i1 + margin, h), min(j1 + margin, w))))
    return out


def _tiled_loss(y_hat, fn, tiles, threads: int):
    """The sum over ``tiles`` of ``fn(part of y_hat, tile)``, a scalar that backpropagates into ``y_hat``.

    With gradients on, each tile's forward and backward pass run at once and only its gradient is
    kept, so memory holds one tile's activations; the tiles' margins overlap and their gradients add."""
    import torch

    def part(t, tile):
        (a0, b0), (a1, b1) = tile[1], tile[2]
        return t[..., a0:a1, b0:b1]

    if not torch.is_grad_enabled() or not y_hat.requires_grad:
        with _threads(threads):
            return sum(fn(part(y_hat, tile), tile) for tile in tiles)
    return _tiled_loss_function()(y_hat, fn, tiles, threads, part)


@functools.lru_cache(maxsize=None)
def _tiled_loss_function():
    import torch

    class TiledLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y_hat, fn, tiles, threads, part):
            grad = torch.zeros_like(y_hat)
            total = y_hat.new_zeros(())
            for tile in tiles:
                with torch.enable_grad(), _threads(threads):
                    leaf = part(y_hat, tile).detach().requires_grad_(True)
                    loss = fn(leaf, tile)
                    loss.backward()
                part(grad, tile).add_(leaf.grad)
                total = total + loss.detach()
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return g * grad, None, None, None, None

    return TiledLoss.apply


def _banded(entropy, chunks, bands, workers: int):
    """``entropy`` run on the latent's bands as the coder runs it on a banded file: each band with its own
    context, forward and backward pass, on one thread, up to ``workers`` bands at once.  So the fit sees
    the rate the file will have, and a band's arithmetic does not depend on how many run at once.  The
    random numbers of a relaxed rounding are drawn first, in the order a pass over the whole latent
    draws them, and each band takes its rows."""
    import torch

    from .codec import _thread_map  # imported here: the codec imports this module

    def each(fn, n):
        return _thread_map(fn, list(range(n)), workers)

    def roundings(var, rounding):
        if rounding is None:
            return [None] * len(bands)
        h, w = var.shape[-2:]
        draws = [rounding.draw((1, c, h, w)) for c in chunks for _ in range(2)]  # anchors, then the rest

        def band(r0, r1):
            taken = iter(draws)
            return lambda r: rounding(r, next(taken)[..., r0:r1, :])

        return [band(r0, r1) for r0, r1 in bands]

    class Banded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, var, psi, rounds):
            def one(k):
                r0, r1 = bands[k]
                with torch.enable_grad():  # grad mode is per thread
                    leaf = var.detach()[..., r0:r1, :].requires_grad_(True)
                    return leaf, entropy(leaf, psi.rows(r0, r1), rounds[k])

            ctx.parts = each(one, len(bands))
            return tuple(torch.cat([out[i].detach() for _, out in ctx.parts], 2) for i in range(3))

        @staticmethod
        def backward(ctx, *grads):
            def one(k):
                r0, r1 = bands[k]
                leaf, out = ctx.parts[k]
                pairs = [(o, g[..., r0:r1, :]) for o, g in zip(out, grads) if g is not None and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)

            parts = each(one, len(bands))
            ctx.parts = None
            return torch.cat(parts, 2), None, None

    def run(var, psi, rounding=None):
        rounds = roundings(var, rounding)
        if torch.is_grad_enabled() and var.requires_grad:
            return Banded.apply(var, psi, rounds)

        def one(k):
            r0, r1 = bands[k]
            with torch.no_grad():
                return entropy(var[..., r0:r1, :], psi.rows(r0, r1), rounds[k])

        parts = each(one, len(bands))
        return tuple(torch.cat([p[i] for p in parts], 2) for i in range(3))

    return run


def _threads(n: int):
    """The codec's block that runs torch's CPU operators on ``n`` threads."""
    from .codec import _threads as threads  # imported here: the codec imports this module

    return threads(n)


def _threaded(t, fn, threads: int):
    """``fn(t)`` run forward and backward on ``threads`` threads, inside a computation on fewer."""
    import torch

    if torch.is_grad_enabled():
        return _threaded_function()(t, fn, threads)
    with _threads(threads):
        return fn(t)


@functools.lru_cache(maxsize=None)
def _threaded_function():
    import torch

    class Threaded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, fn, threads):
            with torch.enable_grad(), _threads(threads):
                leaf = t.detach().requires_grad_(True)
                out = fn(leaf)
            ctx.graph, ctx.threads = (leaf, out), threads
            return out.detach()

        @staticmethod
        def backward(ctx, grad):
            leaf, out = ctx.graph
            with _threads(ctx.threads):
                out.backward(grad)
            return leaf.grad, None, None

    return Threaded.apply


def _sga_rounding(tau: float, gen):
    """Annealed stochastic rounding: ``r`` goes to floor(r) + s, with s in (0, 1) a
    Gumbel-softmax sample (at unit temperature) between floor and ceiling whose log-odds
    are SGA's, ``(atanh(a) - atanh(1 - a)) / tau`` for the ceiling (``a``: the distance
    above the floor); as ``tau`` falls, s goes to 0 or 1 except right at a = 1/2.  SGA
    proper (Yang, Bamler & Mandt 2020) divides the noise by ``tau`` too; on kodim23 at
    quality 0 and 30 (96 steps) that gave 0.3 dB less at about the same bytes."""
    import torch

    def draw(shape):
        """The uniform numbers for a rounding of ``shape``: ``rounding(r, u)`` can take them drawn before."""
        return torch.rand((2,) + tuple(shape), generator=gen)

    def rounding(r, u=None):
        f = torch.floor(r).detach()
        a = (r - f).clamp(1e-5, 1 - 1e-5)
        u = (draw(r.shape) if u is None else u).to(r.device).clamp(1e-10, 1 - 1e-10)
        logits = torch.stack([-torch.atanh(a), -torch.atanh(1 - a)]) / tau - torch.log(-torch.log(u))
        return f + torch.softmax(logits, 0)[1]

    rounding.draw = draw
    return rounding


def _fit_sga(entropy, y, var, psi, pixels, distortion, steps, gen):
    """The fit under stochastic Gumbel annealing: rate and distortion both of the relaxed
    latent, whose rounding hardens as the temperature falls from SGA_TAU to SGA_TAU x
    exp(-SGA_DECAY); Adam at SGA_LR.  The rounded latent is scored every SGA_CHECK steps
    and at the end, and the best one (the analysis transform's own included) is kept."""
    import torch

    def cost(rounding):
        y_hat, mu, sigma = entropy(var, psi, rounding)
        return _bits(y_hat - mu, sigma) / pixels + distortion(y_hat)

    adam = _Adam(var, SGA_LR)
    best, best_loss = y, math.inf
    with torch.enable_grad():
        for i in range(steps + 1):
            if i % SGA_CHECK == 0 or i == steps:
                with torch.no_grad():
                    exact = cost(None).item()
                if exact < best_loss:
                    best, best_loss = var.detach().clone(), exact
            if i == steps:
                break
            loss = cost(_sga_rounding(SGA_TAU * math.exp(-SGA_DECAY * i / steps), gen))
            var.grad = None
            loss.backward()
            adam.step()
    return best


class _Adam:
    """Adam (Kingma & Ba) on one tensor, with the arithmetic of ``torch.optim.Adam``'s single-tensor path.
    Written out because ``torch.optim`` imports torch._dynamo: 2 to 3.5 s of a one-file encode."""

    def __init__(self, var, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.var, self.lr, self.betas, self.eps, self.t = var, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(var), torch.zeros_like(var)

    def step(self):
        import torch

        b1, b2 = self.betas
        g = self.var.grad
        self.t += 1
        with torch.no_grad():
            self.m.lerp_(g, 1 - b1)
            self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (self.v.sqrt() / (1 - b2**self.t) ** 0.5).add_(self.eps)
            self.var.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


class _DctCost:
    """What the refinement layer will make of a reconstruction, in bits.

    The residual x - x_bar is cut into the refinement layer's 8x8 YCbCr DCT blocks.
    Coefficients the dead zone will zero keep their squared error, priced at the
    refinement step's exchange rate of RGB squared error for bits (refine.RDO_PRICE
    x 3 x step^2, as ``refine.encode``); coded ones cost about log2(2|a|) + 2 bits
    (a: the coefficient in steps) and a quantization error that does not depend on
    x_bar.
    """

    def __init__(self, x, step: float, weight, height: int, width: int):
        import torch

        from . import refine

        dev = x.device
        self.x = x.float()
        self.dead_zone = 1 - refine.ROUNDING
        basis = torch.from_numpy(refine._DCT).float()
        self.basis = torch.einsum("ui,vj->uvij", basis, basis).reshape(64, 1, 8, 8).to(dev)
        self.ycc = torch.from_numpy(refine._YCC).float().to(dev)
        chroma = refine.DEFAULT_CHROMA
        self.steps = torch.tensor([step, step * chroma, step * chroma], device=dev).view(1, 3, 1, 1, 1)
        rgb = torch.from_numpy((refine._RGB**2).sum(0)).float().to(dev).view(1, 3, 1, 1, 1)
        self.price = rgb * self.steps**2 / (refine.RDO_PRICE * 3 * step**2)  # bits per squared step of error
        self.inside = torch.zeros(1, 1, *x.shape[-2:], device=dev)
        self.inside[..., :height, :width] = 1
        # per-block weight of the squared error (regions of interest), blocks from the image's corner
        scale = height * width / (x.shape[-1] * x.shape[-2])
        self.block_weight = torch.nn.functional.avg_pool2d(weight * scale, 8).unsqueeze(1)

    def __call__(self, x_bar, rows: slice = slice(None), cols: slice = slice(None)):
        """The cost of ``x_bar``, which covers the image's ``rows`` and ``cols`` (whole 8x8 blocks)."""
        import torch

        r = (self.x[..., rows, cols] - x_bar) * 255 * self.inside[..., rows, cols]
        r = torch.einsum("ck,bkhw->bchw", self.ycc, r)
        b, c, h, w = r.shape
        coef = torch.nn.functional.conv2d(r.reshape(b * c, 1, h, w), self.basis, stride=8)
        a = coef.reshape(b, c, 64, h // 8, w // 8) / self.steps
        zeroed = (a.abs() < self.dead_zone).detach()
        cost = torch.where(zeroed, self.price * a.square(), torch.log2(2 * a.abs() + 1e-6) + 2)
        blocks = self.block_weight[..., _blocks(rows), _blocks(cols)]
        return (cost * blocks).sum()


def _blocks(pixels: slice) -> slice:
    """The 8x8 blocks of a slice of pixels that starts and stops on block edges."""
    return slice(None if pixels.start is None else pixels.start // 8, None if pixels.stop is None else pixels.stop // 8)


def x_layout(x):
    import torch

    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format

