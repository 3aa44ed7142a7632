"""Every configuration key, each with a one-line comment; experiment files override a few."""

import ml_collections


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # digits fashion_mnist cifar10 imagenet64 imagenet64_chrabaszcz lsun_bedroom image_folder
    d.name = "digits"
    d.split = "train"  # split read for training
    d.data_dir = ""  # tensorflow-datasets data_dir ('' = TFDS default, ~/tensorflow_datasets)
    # image_folder: images (LSUN cat, custom data); imagenet64: a prepared folder; fashion_mnist:
    # the four idx .gz files ('' = /usr/share/datasets/fashion-mnist, dataset-fashion-mnist)
    d.folder = ""
    d.image_size = 8  # images are centre-cropped / resized to this square size
    d.num_channels = 1  # 1 (digits) or 3 (RGB)
    d.random_flip = False  # random horizontal flips (the references flip CIFAR/ImageNet/LSUN)
    d.class_conditional = False  # feed class labels to the network
    d.num_classes = 10  # classes of the label embedding when class_conditional
    d.classes = ()  # () = every class; else only the records of these labels (kept as they are)
    d.num_threads = 4  # grain reader threads per process
    return d


def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "unet"  # unet (small, CPU) | ncsnpp (CIFAR-10) | adm (ImageNet/LSUN) | autoencoder_kl
    m.sigma_min = 0.002  # eps: the boundary f(x, eps) = x and the smallest grid noise level
    m.sigma_max = 80.0  # T: the largest noise level (vp_*: unused; the range is model.vp's)
    m.rho = 7.0  # Karras grid exponent
    m.sigma_data = 0.5  # data standard deviation in the scalings
    # edm (EDM / boundary scalings) | trigflow (sCM; c_noise = t) | vp_eps, vp_v: a discrete
    # DDPM network (eps or v prediction on x_vp and the timestep; its schedule model.vp)
    m.parameterization = "edm"
    m.logvar_features = 0  # > 0: sCM's learned loss weighting w(t) on this many Fourier features
    m.dropout = 0.0  # dropout rate (EDM teachers 0.1-0.13, CM students 0)
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, EMA, optimiser stay float32)
    m.attention_impl = "plain"  # plain (jvp-safe einsum) | xla | cudnn | none=auto (fused)
    m.remat = "none"  # backward pass recomputes the network: none | dots (keeps conv/matmul) | full
    m.null_label = False  # class-conditional: one more label row, data.num_classes = no label (CFG)
    # > 0: the student takes LCM's guidance scale w (guided_cd): sinusoidal features of this size
    # (LCM: 256), projected by a zero-initialised Dense into the noise features (UNet, ADM).
    m.guidance_embed_dim = 0
    m.vp = ml_collections.ConfigDict()  # model.parameterization='vp_eps' / 'vp_v' (ddpm, cd)
    m.vp.num_train_timesteps = 1000  # T: the DDPM timesteps 0..T-1 (the CD grid of a VP teacher)
    m.vp.beta_start = 0.0001  # beta_0 (Stable Diffusion: 0.00085)
    m.vp.beta_end = 0.02  # beta_{T-1} (Stable Diffusion: 0.012)
    m.vp.beta_schedule = "linear"  # linear | scaled_linear (SD) | squaredcos_cap_v2 (cosine)
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
    m.adm.dropout_resolution = 0  # dropout only at feature maps <= this size (0 = all; iCT/sCM 16)
    m.autoencoder_kl = ml_collections.ConfigDict()  # training.loss='vae': diffusers' AutoencoderKL
    m.autoencoder_kl.block_out_channels = (32, 64)  # width per level; the image halves per level
    m.autoencoder_kl.layers_per_block = 1  # resnets per encoder level (decoder: one more)
    m.autoencoder_kl.latent_channels = 2  # channels of the latent
    m.autoencoder_kl.norm_num_groups = 16  # GroupNorm groups (divides every width)
    m.autoencoder_kl.mid_block_add_attention = True  # attention in the middle blocks
    return m


def _training() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.loss = "ct"  # edm ddpm cd guided_cd ct (iCT) pd ect cd/ct_continuous sct scd vae
    t.batch_size = 128  # global batch over all devices and hosts
    t.num_steps = 2000  # optimiser steps of the run
    t.n_jitted_steps = 1  # steps fused in one jitted call with lax.scan
    t.micro_batches = 1  # gradient accumulation: each step's batch in this many sequential parts
    t.mesh_fsdp = 1  # devices per parameter-sharding (FSDP) group; the rest is data parallel
    t.log_every = 50  # console line and TensorBoard scalars every this many steps
    t.snapshot_every = 1000  # checkpoint and sample grid every this many steps (and at the end)
    t.keep_checkpoints = 3  # checkpoints kept on disk
    t.resume_reinit_changed = False  # resume a changed state: params/target/EMA kept, the rest new
    t.distance = "l2"  # l1 | l2 | pseudo_huber | lpips
    t.huber_c = -1.0  # pseudo-Huber c; < 0 uses iCT's 0.00054 sqrt(d)
    t.lpips_vgg = ""  # LPIPS: torchvision VGG16 state dict (.pth)
    t.lpips_lin = ""  # LPIPS: linear-head weights (.pth, LPIPS v0.1 vgg)
    t.lpips_pool = "max"  # LPIPS VGG16 pooling: max (LPIPS package, jcm) | avg (piq, PyTorch cm)
    t.lpips_resize = 224  # LPIPS: upsample images below 256 px to this size first (0 = never)
    t.weighting = "uniform"  # uniform | snr | snr+1 | karras | truncated-snr | ict (1/(t - t2))
    t.solver = "heun"  # CD teacher ODE step: heun | euler | ddim | dpm_solver_2 (DPM-Solver++(2S))
    t.skip_steps = 1  # cd/ct/guided_cd: pairs (t_i, t_{i+k}) of the N grid, one teacher step (LCM)
    # guided_cd: w ~ U[guidance_min, guidance_max] per example, LCM's convention: the teacher is
    # D(y) + w (D(y) - D(null)), i.e. the usual guidance scale 1 + w (w = 0: conditional teacher).
    # ct with a guided network (LCF): the same w given to the online and the target network.
    t.guidance_min = 0.0
    t.guidance_max = 4.0
    t.target_ema_mode = "fixed"  # fixed | adaptive (mu(k))
    t.scale_mode = "fixed"  # fixed | progressive (N(k)) | exponential (iCT N(k)); PD: progdist
    t.start_ema = 0.95  # mu (fixed) or mu0 (adaptive)
    t.start_scales = 40  # N (fixed) or s0 (progressive); pd: the first stage's student steps
    t.end_scales = 40  # s1 (progressive)
    t.total_steps = -1  # K of N(k); -1 = num_steps
    t.distill_steps_per_iter = 50000  # pd: steps per stage (N halves after each)
    t.index_sampling = "uniform"  # CD/CT grid-pair index: uniform | lognormal (iCT)
    t.p_mean = -1.1  # iCT indices, ECT t, sCM sd tan t: ln ~ N(p_mean, p_std^2) (not EDM's)
    t.p_std = 2.0  # see p_mean
    t.ect_q = 2.0  # ECT: dt = t - r shrinks by q every stage
    t.ect_k = 8.0  # ECT: n(t) = 1 + k sigmoid(-b t)
    t.ect_b = 1.0  # ECT: see ect_k
    t.ect_stage_steps = 25000  # ECT: steps per stage
    # ECT trains with the EDM scalings, as its reference does (ECMPrecond in training mode),
    # and samples with the boundary ones; 'boundary' trains with those (slower: see the toy).
    t.ect_scalings = "edm"
    t.continuous_stopgrad = False  # cd/ct_continuous: jcm's stop-gradient pseudo-loss
    t.scm_tangent_c = 0.1  # sCM: tangent normalisation g / (||g|| + c)
    t.scm_warmup_steps = 10000  # sCM: tangent warm-up H (0 = none)
    t.ema_rates = (0.9999,)  # one evaluation EMA copy per rate; samples use the first
    t.ema_warmup = False  # EMA rate min(rate, (1 + k)/(10 + k)) at step k: for short runs
    t.teacher_checkpoint = ""  # CD: checkpoint dir of the EDM teacher (an edm run's checkpoints)
    t.teacher_ema_index = 0  # which EMA copy of the teacher checkpoint to distill
    t.init_from_teacher = False  # start the student from the teacher (CD as the references)
    # Start params, target and EMA from a consistency model's checkpoint dir of this very network
    # (LCF: a guided_cd student's, guidance_proj included); '' = a fresh or teacher init.
    t.init_checkpoint = ""
    t.init_ema_index = 0  # which EMA copy of training.init_checkpoint to start from
    t.edm_p_mean = -1.2  # EDM: ln sigma ~ N(p_mean, p_std^2)
    t.edm_p_std = 1.2  # EDM: see edm_p_mean
    t.label_dropout = 0.0  # edm/ddpm: label -> the null class at this rate (needs null_label)
    t.vae_kl_weight = 1e-6  # vae: loss = distance (pixel mean) + this x KL (sum over the latent)
    t.vae_lpips_weight = 1.0  # vae with training.distance='lpips': l1 + this weight x LPIPS (LDM's)
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
    s.steps = 40  # N of the grid that `ts` and `timesteps` index (diffusers' num_train_timesteps)
    s.ts = ()  # () = one step; else grid indices ending at steps-1, e.g. (0, 22, 39)
    s.timesteps = ()  # diffusers' timesteps, not ts: descending indices; (22, 0) = ts (0, 22, 39)
    s.sigmas = ()  # explicit noise levels (EDM sigma), e.g. (80.0, 0.821); wins over ts
    s.num_samples = 64  # images written by --mode=sample
    s.batch_size = 64  # images per sampling call (global)
    s.grid_size = 64  # images in each snapshot PNG grid (0 = no grids)
    s.teacher_steps = 18  # EDM models: Heun grid size N (2N-1 evaluations); ddpm: DDIM steps
    s.clip_denoised = True  # clamp every denoised output to [-1, 1] (as the references)
    s.class_label = -1  # class-conditional: -1 draws labels at random, else this class
    # LCM's w (usual scale 1 + w): guided_cd students' w input; EDM teachers with null_label
    # sample the guided ODE D(y) + w (D(y) - D(null)) (CFG). 0: the conditional model.
    s.guidance = 0.0
    s.checkpoint_step = -1  # --mode=sample: checkpoint step (-1 = latest)
    s.ema_index = 0  # --mode=sample: which EMA copy
    s.seed = 0  # sample k's noise comes from fold_in(seed, k)
    return s


def _edit() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.task = "inpaint"  # inpaint | colorize | superres | stroke | denoise | interpolate
    e.input = ""  # a folder of PNGs or an .npz with arr_0 uint8 NHWC (interpolate reads none)
    e.mask = ""  # inpaint: a PNG, white = known pixel ('' = a centred square of half size unknown)
    e.ts = ()  # grid indices ending at steps-1; () = 4 evenly spaced evaluations
    e.steps = 40  # N of the grid that `ts` indexes
    e.patch_size = 4  # superres: keep each p x p patch's mean (inputs full size or size/p)
    e.stroke_index = 20  # stroke: first index of the default ts (SDEdit's starting noise level)
    e.noise_sigma = 0.5  # denoise: noise N(0, sigma^2) added to the inputs, then removed by f
    e.num_interpolations = 8  # interpolate: images along each slerp path, ends included
    e.num_pairs = 4  # interpolate: pairs of random latents
    e.seed = 0  # image k's noise comes from fold_in(seed, k)
    e.ema_index = 0  # which EMA copy of the checkpoint
    e.checkpoint_step = -1  # checkpoint step (-1 = latest)
    e.out = ""  # output folder ('' = WORKDIR/edits/TASK)
    return e


def _eval() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.num_samples = 50000  # --mode=eval: samples per checkpoint and setting (the papers' 50k)
    e.every_steps = 0  # > 0: FID of every setting while training, every this many steps (and last)
    e.checkpoint_steps = ()  # checkpoints to score: () = the latest, else each listed step
    e.settings = ("1",)  # samplers: '1' one step | 'i0,...,N-1' ts | 'sigma=80,0.8' | EDM: 'N'
    # | 'search' or 'search=lo,hi': ternary search on FID of i in the two-step ts (0, i, N-1)
    # inception (FID Inception-v3) | digits | fashion_mnist: that dataset's small classifier
    e.features = "inception"
    e.inception_path = ""  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
    e.resize = "torch"  # Inception's 299 px resize: torch (pytorch-fid) | tf1 (ADM) | clean_legacy
    e.reference = ""  # ADM reference batch or mu/sigma npz; '' = computed from reference_split
    e.reference_split = "train"  # dataset split of a computed reference (cached: e.cache_dir)
    e.reference_limit = 50000  # computed reference: its first this many images (0 = all)
    e.cache_dir = ""  # dataset classifiers and reference statistics ('' = WORKDIR/eval/cache)
    e.batch_size = 256  # images per sampling and feature call (global; a multiple of devices)
    e.chunk_size = 5000  # sample ids per resumable shard (a rerun reuses finished shards)
    e.save_samples = True  # keep the uint8 samples in the shards too (not only features)
    e.ema_index = 0  # which EMA copy of the checkpoint is scored
    return e


def _latent() -> ml_collections.ConfigDict:
    lat = ml_collections.ConfigDict()
    # A diffusers vae/ folder, or the workdir of a training.loss='vae' run ('' = pixel space).
    # Set, the network models its scaled latents: data.image_size / num_channels are the latent's.
    lat.vae = ""
    lat.cache = ""  # the encoded dataset (--mode=encode writes it) ('' = WORKDIR/latents)
    lat.image_size = 0  # side of the images the autoencoder encodes (0 = its config's sample_size)
    lat.sample = "mean"  # encode each image as its posterior's mean | a sample (latent.seed)
    lat.seed = 0  # latent.sample='sample': image k's noise comes from fold_in(seed, k)
    lat.batch_size = 256  # --mode=encode: images per encoder call
    lat.shard_size = 4096  # --mode=encode: images per resumable shard
    return lat


def get_config() -> ml_collections.ConfigDict:
    """The defaults: a consistency-training run on the bundled digits with the small UNet."""
    config = ml_collections.ConfigDict()
    config.seed = 42  # base seed of init, data order and loss noise (fold_in by step)
    config.data = _data()
    config.model = _model()
    config.training = _training()
    config.optim = _optim()
    config.sampling = _sampling()
    config.edit = _edit()
    config.eval = _eval()
    config.latent = _latent()
    return config
