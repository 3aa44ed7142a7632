"""Every configuration key, each with a one-line comment; experiment files override a few."""

import ml_collections


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = "digits"  # digits | cifar10 | imagenet64 | lsun_bedroom | image_folder
    d.split = "train"  # split read for training
    d.data_dir = ""  # tensorflow-datasets data_dir ('' = TFDS default, ~/tensorflow_datasets)
    d.folder = ""  # image_folder: the image directory (LSUN cat, custom data)
    d.image_size = 8  # images are centre-cropped / resized to this square size
    d.num_channels = 1  # 1 (digits) or 3 (RGB)
    d.random_flip = False  # random horizontal flips (the references flip CIFAR/ImageNet/LSUN)
    d.class_conditional = False  # feed class labels to the network
    d.num_classes = 10  # classes of the label embedding when class_conditional
    d.num_threads = 4  # grain reader threads per process
    return d


def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "unet"  # unet (small, for CPU) | ncsnpp (CIFAR-10 paper net) | adm (ImageNet/LSUN)
    m.sigma_min = 0.002  # eps: the boundary f(x, eps) = x and the smallest grid noise level
    m.sigma_max = 80.0  # T: the largest noise level
    m.rho = 7.0  # Karras grid exponent
    m.sigma_data = 0.5  # data standard deviation in the scalings
    m.dropout = 0.0  # dropout rate (EDM teachers 0.1-0.13, CM students 0)
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, EMA, optimiser stay float32)
    m.attention_impl = "plain"  # plain (jvp-safe einsum) | xla | cudnn | none=auto (fused)
    m.unet = ml_collections.ConfigDict()
    m.unet.channels = 32  # base width
    m.unet.channel_mult = (1, 2)  # width multiplier per resolution level
    m.unet.num_res_blocks = 1  # residual blocks per level
    m.unet.attn_resolutions = (4,)  # feature-map sizes with self-attention
    m.unet.num_heads = 1  # attention heads
    m.ncsnpp = ml_collections.ConfigDict()
    m.ncsnpp.nf = 128  # base width
    m.ncsnpp.ch_mult = (2, 2, 2)  # width multiplier per level
    m.ncsnpp.num_res_blocks = 4  # BigGAN residual blocks per level
    m.ncsnpp.attn_resolutions = (16,)  # feature-map sizes with DDPM attention
    m.ncsnpp.fourier_scale = 16.0  # Gaussian Fourier embedding scale (16 paper, 0.02 iCT)
    m.ncsnpp.embedding_type = "fourier"  # fourier | positional
    m.ncsnpp.init_scale = 0.0  # output-layer init scale (0 = zero init, as the paper)
    m.adm = ml_collections.ConfigDict()
    m.adm.model_channels = 192  # base width (num_channels)
    m.adm.channel_mult = (1, 2, 3, 4)  # width multiplier per level
    m.adm.num_res_blocks = 3  # residual blocks per level
    m.adm.attention_resolutions = (32, 16, 8)  # feature-map sizes with attention (cm's flag)
    m.adm.num_head_channels = 64  # channels per head (wins over num_heads when > 0)
    m.adm.num_heads = 4  # heads when num_head_channels = -1
    m.adm.use_scale_shift_norm = True  # FiLM-style time conditioning in the res blocks
    m.adm.resblock_updown = True  # up/down sampling inside residual blocks
    return m


def _training() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.loss = "ct"  # edm (teacher) | cd (distillation) | ct (consistency training)
    t.batch_size = 128  # global batch over all devices and hosts
    t.num_steps = 2000  # optimiser steps of the run
    t.n_jitted_steps = 1  # steps fused in one jitted call with lax.scan
    t.log_every = 50  # console line and TensorBoard scalars every this many steps
    t.snapshot_every = 1000  # checkpoint and sample grid every this many steps (and at the end)
    t.keep_checkpoints = 3  # checkpoints kept on disk
    t.distance = "l2"  # l1 | l2 | pseudo_huber | lpips
    t.huber_c = -1.0  # pseudo-Huber c; < 0 uses iCT's 0.00054 sqrt(d)
    t.lpips_vgg = ""  # LPIPS: torchvision VGG16 state dict (.pth)
    t.lpips_lin = ""  # LPIPS: linear-head weights (.pth, LPIPS v0.1 vgg)
    t.weighting = "uniform"  # uniform | snr | snr+1 | karras | truncated-snr
    t.solver = "heun"  # CD teacher ODE step: heun | euler
    t.target_ema_mode = "fixed"  # fixed | adaptive (mu(k))
    t.scale_mode = "fixed"  # fixed | progressive (N(k)) | progdist
    t.start_ema = 0.95  # mu (fixed) or mu0 (adaptive)
    t.start_scales = 40  # N (fixed) or s0 (progressive)
    t.end_scales = 40  # s1 (progressive)
    t.total_steps = -1  # K of N(k); -1 = num_steps
    t.distill_steps_per_iter = 50000  # progdist stage length
    t.ema_rates = (0.9999,)  # one evaluation EMA copy per rate; samples use the first
    t.teacher_checkpoint = ""  # CD: checkpoint dir of the EDM teacher (an edm run's checkpoints)
    t.teacher_ema_index = 0  # which EMA copy of the teacher checkpoint to distill
    t.init_from_teacher = False  # start the student from the teacher (CD as the references)
    t.edm_p_mean = -1.2  # EDM: ln sigma ~ N(p_mean, p_std^2)
    t.edm_p_std = 1.2  # EDM: see edm_p_mean
    return t


def _optim() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.optimizer = "radam"  # radam | adam
    o.lr = 4e-4  # learning rate (constant after warm-up)
    o.beta1 = 0.9  # first-moment decay
    o.beta2 = 0.999  # second-moment decay
    o.eps = 1e-8  # denominator epsilon
    o.weight_decay = 0.0  # decoupled weight decay
    o.warmup_steps = 0  # linear warm-up steps (0 = none, as the CM references)
    o.grad_clip = 0.0  # global-norm clip (0 = none, as the CM references)
    return o


def _sampling() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.steps = 40  # N of the grid that `ts` indexes
    s.ts = ()  # () = one step; else grid indices ending at steps-1, e.g. (0, 22, 39)
    s.num_samples = 64  # images written by --mode=sample
    s.batch_size = 64  # images per sampling call (global)
    s.grid_size = 64  # images in each snapshot PNG grid
    s.teacher_steps = 18  # EDM models: Heun grid size N (2N-1 network evaluations)
    s.clip_denoised = True  # clamp every denoised output to [-1, 1] (as the references)
    s.class_label = -1  # class-conditional: -1 draws labels at random, else this class
    s.checkpoint_step = -1  # --mode=sample: checkpoint step (-1 = latest)
    s.ema_index = 0  # --mode=sample: which EMA copy
    s.seed = 0  # sample k's noise comes from fold_in(seed, k)
    return s


def get_config() -> ml_collections.ConfigDict:
    """The defaults: a consistency-training run on the bundled digits with the small UNet."""
    config = ml_collections.ConfigDict()
    config.seed = 42  # base seed of init, data order and loss noise (fold_in by step)
    config.data = _data()
    config.model = _model()
    config.training = _training()
    config.optim = _optim()
    config.sampling = _sampling()
    return config
