//! Architecture specs: the released VGG8 and VGG11, a width multiplier, custom JSON architectures, the
//! adaptive patch grid `P_l = alpha * C_L / C_l`, parameter shapes and Kaiming initialisation.
//! Pure data and arithmetic; no backend code.

pub mod grid;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use grid::PatchGrid;

/// How a patch's squared activations reduce to one goodness value (docs/method.md §4, §14).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GoodnessReduce {
    /// `mean_{bin} y^2` (released code, default).
    Mean,
    /// `sum_{bin} y^2` (the paper's text, as the blog reads it).
    Sum,
}

/// The 2x2 downsampling pool after a pooling layer (docs/method.md §6, §14).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// `AvgPool2d(2)` (released code, default).
    Avg,
    /// `sqrt(mean_{2x2} y^2)` (the paper's "RMS pooling").
    Rms,
}

/// One conv layer: 3x3, stride 1, padding 1, bias, ReLU, then goodness, optional 2x2 pool, dropout, RMS norm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    pub c_in: usize,
    pub c_out: usize,
    /// Spatial size of the input and of the conv output (padding 1 keeps it).
    pub h: usize,
    pub w: usize,
    /// Patches per axis, `P_l`.
    pub p: usize,
    /// 2x2 pool after the goodness branch.
    pub pool: bool,
}

impl LayerSpec {
    /// Goodness length `D_l = C_l * P_l^2`.
    pub fn goodness_dim(&self) -> usize {
        self.c_out * self.p * self.p
    }
    /// Spatial size after the optional pool.
    pub fn out_hw(&self) -> (usize, usize) {
        if self.pool {
            (self.h / 2, self.w / 2)
        } else {
            (self.h, self.w)
        }
    }
    pub fn weight_len(&self) -> usize {
        self.c_out * self.c_in * 9
    }
    pub fn grid(&self) -> PatchGrid {
        PatchGrid::new(self.p, self.h, self.w)
    }
    /// Multiply-accumulates of the forward conv per image.
    pub fn conv_macs(&self) -> usize {
        self.h * self.w * self.c_out * self.c_in * 9
    }
}

/// A whole network plus the method's switches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: String,
    pub width: f64,
    pub in_channels: usize,
    pub image_size: usize,
    pub classes: usize,
    pub alpha: f64,
    pub goodness: GoodnessReduce,
    pub pool_kind: PoolKind,
    pub layers: Vec<LayerSpec>,
}

/// Architecture before it meets a dataset: base channel counts and where to pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchSpec {
    pub name: String,
    pub layers: Vec<ArchLayer>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchLayer {
    pub channels: usize,
    #[serde(default)]
    pub pool: bool,
}

/// The released `VGG8.py`: 7 conv layers, pools after layers 2, 4, 5, 6 (1-based).
pub fn vgg8() -> ArchSpec {
    let ch = [128, 256, 256, 512, 512, 512, 512];
    let pool = [false, true, false, true, true, true, false];
    arch("vgg8", &ch, &pool)
}

/// The released `VGG11.py`: 10 conv layers, pools after layers 2, 4, 6, 8 (1-based).
pub fn vgg11() -> ArchSpec {
    let ch = [128, 256, 256, 512, 512, 512, 512, 512, 512, 512];
    let pool = [false, true, false, true, false, true, false, true, false, false];
    arch("vgg11", &ch, &pool)
}

/// `vgg-imagenet`: torchvision's VGG-11 feature stack (8 conv layers, 64-128-256-256-512-512-512-512, a pool
/// after layers 1, 2, 4, 6 and 8), so that `P_l` follows the released 64/128/256/512 -> 8/4/2/1 table. At 64x64
/// the last layer outputs 2x2, at 224x224 7x7.
pub fn vgg_imagenet() -> ArchSpec {
    let ch = [64, 128, 256, 256, 512, 512, 512, 512];
    let pool = [true, true, false, true, false, true, false, true];
    arch("vgg-imagenet", &ch, &pool)
}

fn arch(name: &str, ch: &[usize], pool: &[bool]) -> ArchSpec {
    ArchSpec {
        name: name.to_string(),
        layers: ch.iter().zip(pool).map(|(&channels, &pool)| ArchLayer { channels, pool }).collect(),
    }
}

/// `vgg8`, `vgg11`, or a path to a JSON file `{"name": ..., "layers": [{"channels": 64, "pool": false}, ...]}`.
pub fn arch_by_name(name: &str) -> Result<ArchSpec> {
    match name {
        "vgg8" => Ok(vgg8()),
        "vgg11" => Ok(vgg11()),
        "vgg-imagenet" => Ok(vgg_imagenet()),
        path if path.ends_with(".json") => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--model {path}: cannot read"))?;
            let spec: ArchSpec =
                serde_json::from_str(&text).with_context(|| format!("--model {path}: not an architecture JSON"))?;
            if spec.layers.is_empty() {
                bail!("--model {path}: the architecture has no layers");
            }
            for (i, l) in spec.layers.iter().enumerate() {
                if l.channels == 0 || l.channels > MAX_CHANNELS {
                    bail!("--model {path}: layer {} has {} channels (1 to {MAX_CHANNELS})", i + 1, l.channels);
                }
            }
            Ok(spec)
        }
        other => bail!("--model: unknown model '{other}' (expected vgg8, vgg11, vgg-imagenet or a .json file)"),
    }
}

/// The most channels a layer may have (far above any real network; the memory estimate refuses much less on
/// most machines). It keeps every size product of a layer well inside 64 bits.
pub const MAX_CHANNELS: usize = 1 << 20;

/// The largest image side a model may take.
pub const MAX_IMAGE_SIDE: usize = 1 << 16;

/// Scale a channel count by `width`, rounded to a multiple of 8 and at least 8. `layer` is 0-based (messages
/// count from 1).
pub fn scale_channels(c: usize, width: f64, layer: usize) -> Result<usize> {
    if !(width.is_finite() && width > 0.0) {
        bail!("--width {width}: must be a positive number");
    }
    let scaled = c as f64 * width;
    if scaled < 1.0 {
        bail!("--width {width} leaves layer {} with no channels ({c} x {width} = {scaled:.3} < 1)", layer + 1);
    }
    let rounded = ((scaled / 8.0).round() * 8.0).max(8.0);
    if rounded > MAX_CHANNELS as f64 {
        bail!(
            "--width {width} gives layer {} {rounded:.0} channels ({c} x {width}); at most {MAX_CHANNELS}",
            layer + 1
        );
    }
    Ok(rounded as usize)
}

/// `P_l = alpha * C_L / C_l`, rounded and clamped to `[1, min(H_l, W_l)]` (docs/method.md §3).
pub fn patch_grid_size(alpha: f64, c_last: usize, c_l: usize, h: usize, w: usize) -> usize {
    let p = (alpha * c_last as f64 / c_l as f64).round();
    (p.max(1.0) as usize).min(h.min(w)).max(1)
}

/// Everything a [`ModelSpec`] needs beyond the architecture.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub width: f64,
    pub alpha: f64,
    pub goodness: GoodnessReduce,
    pub pool_kind: PoolKind,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { width: 1.0, alpha: 1.0, goodness: GoodnessReduce::Mean, pool_kind: PoolKind::Avg }
    }
}

impl ModelSpec {
    /// Checks a spec that comes from a file (a checkpoint's `asge.model`) as strictly as [`ModelSpec::build`]
    /// makes one: every count in range, the layers chained (each takes the previous one's channels and output
    /// size), every patch grid inside its map, and every size product inside 64 bits.
    pub fn validate(&self) -> Result<()> {
        if self.layers.is_empty() {
            bail!("the model has no layers");
        }
        if self.classes < 2 || self.classes > MAX_CHANNELS {
            bail!("{} classes (2 to {MAX_CHANNELS})", self.classes);
        }
        if !(self.width.is_finite() && self.width > 0.0 && self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("width {} and alpha {} must be positive numbers", self.width, self.alpha);
        }
        let (mut c, mut h, mut w) = (self.in_channels, self.image_size, self.image_size);
        for (i, l) in self.layers.iter().enumerate() {
            let n = i + 1;
            if l.c_in != c || l.h != h || l.w != w {
                bail!("layer {n} takes {}x{}x{}, the layer before gives {c}x{h}x{w}", l.c_in, l.h, l.w);
            }
            if l.c_in == 0 || l.c_in > MAX_CHANNELS || l.c_out == 0 || l.c_out > MAX_CHANNELS {
                bail!("layer {n}: {} -> {} channels (1 to {MAX_CHANNELS})", l.c_in, l.c_out);
            }
            if l.h == 0 || l.w == 0 || l.h > MAX_IMAGE_SIDE || l.w > MAX_IMAGE_SIDE {
                bail!("layer {n}: a {}x{} map", l.h, l.w);
            }
            if l.p == 0 || l.p > l.h.min(l.w) {
                bail!("layer {n}: a {0}x{0} patch grid on a {1}x{2} map", l.p, l.h, l.w);
            }
            if l.pool && (l.h < 2 || l.w < 2) {
                bail!("layer {n} pools a {}x{} map", l.h, l.w);
            }
            crate::limits::product(format!("layer {n}"), &[l.c_out, l.c_in, 9])?;
            crate::limits::product(format!("layer {n}"), &[l.c_out.max(l.c_in), l.h, l.w])?;
            crate::limits::product(format!("layer {n}"), &[l.c_out, l.p, l.p, self.classes])?;
            (c, (h, w)) = (l.c_out, l.out_hw());
        }
        Ok(())
    }

    /// Resolve an architecture for a dataset's input channels, image size and class count.
    pub fn build(
        arch: &ArchSpec,
        in_channels: usize,
        image_size: usize,
        classes: usize,
        opt: &ModelOptions,
    ) -> Result<Self> {
        if !(opt.alpha.is_finite() && opt.alpha > 0.0) {
            bail!("--alpha {}: must be a positive number", opt.alpha);
        }
        if classes < 2 {
            bail!("the dataset has {classes} class(es); at least 2 are needed");
        }
        if in_channels == 0 || in_channels > MAX_CHANNELS {
            bail!("the input has {in_channels} channels (1 to {MAX_CHANNELS})");
        }
        if image_size == 0 || image_size > MAX_IMAGE_SIDE {
            bail!("--image-size {image_size}: the model takes 1 to {MAX_IMAGE_SIDE} pixels a side");
        }
        let channels: Vec<usize> = arch
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| scale_channels(l.channels, opt.width, i))
            .collect::<Result<_>>()?;
        let c_last = *channels.last().context("architecture has no layers")?;
        let mut layers = Vec::with_capacity(channels.len());
        let (mut c_in, mut h, mut w) = (in_channels, image_size, image_size);
        for (i, (l, &c_out)) in arch.layers.iter().zip(&channels).enumerate() {
            if h == 0 || w == 0 {
                bail!(
                    "model {}: layer {} gets an empty {h}x{w} input (too many pools for {image_size}px)",
                    arch.name,
                    i + 1
                );
            }
            if l.pool && (h < 2 || w < 2) {
                bail!("model {}: layer {} pools a {h}x{w} map", arch.name, i + 1);
            }
            let p = patch_grid_size(opt.alpha, c_last, c_out, h, w);
            let spec = LayerSpec { c_in, c_out, h, w, p, pool: l.pool };
            (h, w) = spec.out_hw();
            c_in = c_out;
            layers.push(spec);
        }
        Ok(ModelSpec {
            arch: arch.name.clone(),
            width: opt.width,
            in_channels,
            image_size,
            classes,
            alpha: opt.alpha,
            goodness: opt.goodness,
            pool_kind: opt.pool_kind,
            layers,
        })
    }

    /// Goodness sizes `D_l` per layer.
    pub fn goodness_dims(&self) -> Vec<usize> {
        self.layers.iter().map(LayerSpec::goodness_dim).collect()
    }

    /// Trainable conv parameters (weights + biases).
    pub fn conv_params(&self) -> usize {
        self.layers.iter().map(|l| l.weight_len() + l.c_out).sum()
    }

    /// Layers with a fusion head: 1..L (0-based), as in the released code (none on the first layer).
    pub fn head_layers(&self) -> std::ops::Range<usize> {
        1..self.layers.len()
    }

    /// Trainable fusion-head parameters.
    pub fn head_params(&self) -> usize {
        self.head_layers().map(|i| (self.layers[i].c_out + 1) * self.classes).sum()
    }

    /// Fixed projection parameters (never trained).
    pub fn projection_params(&self) -> usize {
        self.layers.iter().map(|l| (l.goodness_dim() + 1) * self.classes).sum()
    }

    /// Forward multiply-accumulates per image (convs only; the goodness and heads are negligible).
    pub fn conv_macs(&self) -> usize {
        self.layers.iter().map(LayerSpec::conv_macs).sum()
    }
}

/// One tensor of a model, by the 0-based index of the layer it belongs to: the parameter table, written once.
/// Its name (PyTorch's, in checkpoints and exports), its shape, whether AdamW trains it, and where it sits in
/// [`Params`] all come from here; [`ModelSpec::tensors`] lists a model's in the files' order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    /// `layers.{l}.conv.weight`, `[C_out, C_in, 3, 3]`.
    ConvW(usize),
    /// `layers.{l}.conv.bias`, `[C_out]`.
    ConvB(usize),
    /// `layers.{l}.proj.weight`, `[D_l, N]` (fixed).
    ProjW(usize),
    /// `layers.{l}.proj.bias`, `[N]` (fixed).
    ProjB(usize),
    /// `heads.{l}.weight`, `[N, C_l]`: the fusion head of layer `l` (layers 1.. have one).
    HeadW(usize),
    /// `heads.{l}.bias`, `[N]`.
    HeadB(usize),
}

impl Tensor {
    /// The tensor's name in checkpoints and exports.
    pub fn name(self) -> String {
        match self {
            Tensor::ConvW(l) => format!("layers.{l}.conv.weight"),
            Tensor::ConvB(l) => format!("layers.{l}.conv.bias"),
            Tensor::ProjW(l) => format!("layers.{l}.proj.weight"),
            Tensor::ProjB(l) => format!("layers.{l}.proj.bias"),
            Tensor::HeadW(l) => format!("heads.{l}.weight"),
            Tensor::HeadB(l) => format!("heads.{l}.bias"),
        }
    }

    /// Its shape in `spec` (PyTorch's layout).
    pub fn shape(self, spec: &ModelSpec) -> Vec<usize> {
        let n = spec.classes;
        match self {
            Tensor::ConvW(l) => vec![spec.layers[l].c_out, spec.layers[l].c_in, 3, 3],
            Tensor::ConvB(l) => vec![spec.layers[l].c_out],
            Tensor::ProjW(l) => vec![spec.layers[l].goodness_dim(), n],
            Tensor::ProjB(_) | Tensor::HeadB(_) => vec![n],
            Tensor::HeadW(l) => vec![n, spec.layers[l].c_out],
        }
    }

    /// Trained by AdamW (with optimizer state); the projection is fixed.
    pub fn trained(self) -> bool {
        !matches!(self, Tensor::ProjW(_) | Tensor::ProjB(_))
    }

    /// The index of layer `l`'s fusion head among the heads (layer 0 has none).
    pub fn head_index(l: usize) -> usize {
        l - 1
    }
}

impl ModelSpec {
    /// Every tensor of the model, in the files' order: per layer its conv weight and bias and its projection,
    /// then the fusion heads.
    pub fn tensors(&self) -> Vec<Tensor> {
        let layers = (0..self.layers.len())
            .flat_map(|l| [Tensor::ConvW(l), Tensor::ConvB(l), Tensor::ProjW(l), Tensor::ProjB(l)]);
        layers.chain(self.head_layers().flat_map(|l| [Tensor::HeadW(l), Tensor::HeadB(l)])).collect()
    }
}

/// Parameters of a model, host side, f32, in PyTorch layouts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    pub layers: Vec<LayerParams>,
    /// `heads[Tensor::head_index(l)]` belongs to layer `l`.
    pub heads: Vec<HeadParams>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerParams {
    /// `[C_out, C_in, 3, 3]`.
    pub conv_w: Vec<f32>,
    pub conv_b: Vec<f32>,
    /// `[D_l, N]`, fixed.
    pub proj_w: Vec<f32>,
    /// `[N]`, fixed.
    pub proj_b: Vec<f32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadParams {
    /// `[N, C_l]`.
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl Params {
    /// Empty tensors in the shape of `spec`'s table (one layer and head entry each), to be filled.
    pub fn empty(spec: &ModelSpec) -> Params {
        Params {
            layers: vec![LayerParams::default(); spec.layers.len()],
            heads: vec![HeadParams::default(); spec.head_layers().len()],
        }
    }

    /// The values of tensor `t`.
    pub fn get(&self, t: Tensor) -> &Vec<f32> {
        match t {
            Tensor::ConvW(l) => &self.layers[l].conv_w,
            Tensor::ConvB(l) => &self.layers[l].conv_b,
            Tensor::ProjW(l) => &self.layers[l].proj_w,
            Tensor::ProjB(l) => &self.layers[l].proj_b,
            Tensor::HeadW(l) => &self.heads[Tensor::head_index(l)].w,
            Tensor::HeadB(l) => &self.heads[Tensor::head_index(l)].b,
        }
    }

    /// The values of tensor `t`, to write.
    pub fn get_mut(&mut self, t: Tensor) -> &mut Vec<f32> {
        match t {
            Tensor::ConvW(l) => &mut self.layers[l].conv_w,
            Tensor::ConvB(l) => &mut self.layers[l].conv_b,
            Tensor::ProjW(l) => &mut self.layers[l].proj_w,
            Tensor::ProjB(l) => &mut self.layers[l].proj_b,
            Tensor::HeadW(l) => &mut self.heads[Tensor::head_index(l)].w,
            Tensor::HeadB(l) => &mut self.heads[Tensor::head_index(l)].b,
        }
    }
    /// Kaiming-normal (fan_in, ReLU gain: std = sqrt(2 / fan_in)) for every conv and head, zero biases,
    /// and the fixed projection and its bias drawn N(0, 1/N) (released code).
    pub fn init(spec: &ModelSpec, seed: u64) -> Params {
        let n = spec.classes;
        let proj_std = 1.0 / (n as f64).sqrt();
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let key = crate::rng::derive(seed, 1000 + i as u64);
                let mut rng = crate::rng::Rng::new(key);
                let std = (2.0 / (l.c_in * 9) as f64).sqrt();
                let conv_w = (0..l.weight_len()).map(|_| (rng.normal() * std) as f32).collect();
                let mut prng = crate::rng::Rng::new(crate::rng::derive(key, 1));
                let proj_w = (0..l.goodness_dim() * n).map(|_| (prng.normal() * proj_std) as f32).collect();
                let proj_b = (0..n).map(|_| (prng.normal() * proj_std) as f32).collect();
                LayerParams { conv_w, conv_b: vec![0.0; l.c_out], proj_w, proj_b }
            })
            .collect();
        let heads = spec
            .head_layers()
            .map(|i| {
                let c = spec.layers[i].c_out;
                let mut rng = crate::rng::Rng::new(crate::rng::derive(seed, 2000 + i as u64));
                let std = (2.0 / c as f64).sqrt();
                HeadParams { w: (0..n * c).map(|_| (rng.normal() * std) as f32).collect(), b: vec![0.0; n] }
            })
            .collect();
        Params { layers, heads }
    }
}

/// Reads the `--model` argument and resolves it against a dataset's shape.
pub fn resolve(
    model: &str,
    in_channels: usize,
    image_size: usize,
    classes: usize,
    opt: &ModelOptions,
) -> Result<ModelSpec> {
    let arch = arch_by_name(model)?;
    ModelSpec::build(&arch, in_channels, image_size, classes, opt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vgg8_mnist() -> ModelSpec {
        ModelSpec::build(&vgg8(), 1, 32, 10, &ModelOptions::default()).unwrap()
    }

    #[test]
    fn vgg8_goodness_sizes_and_params_match_spec() {
        let m = vgg8_mnist();
        assert_eq!(m.goodness_dims(), vec![2048, 1024, 1024, 512, 512, 512, 512]);
        assert_eq!(m.layers.iter().map(|l| l.p).collect::<Vec<_>>(), vec![4, 2, 2, 1, 1, 1, 1]);
        assert_eq!(m.conv_params(), 9_146_112);
        assert_eq!(m.head_params(), 25_660);
        assert_eq!(m.projection_params(), 61_510);
        let out: Vec<_> = m.layers.iter().map(|l| l.out_hw().0).collect();
        assert_eq!(out, vec![32, 16, 16, 8, 4, 2, 2]);
    }

    #[test]
    fn vgg8_rgb_and_cifar100_params_match_spec() {
        let m = ModelSpec::build(&vgg8(), 3, 32, 10, &ModelOptions::default()).unwrap();
        assert_eq!(m.conv_params(), 9_148_416);
        let m = ModelSpec::build(&vgg8(), 3, 32, 100, &ModelOptions::default()).unwrap();
        assert_eq!(m.head_params(), 256_600);
        assert_eq!(m.projection_params(), 615_100);
    }

    #[test]
    fn vgg11_params_match_spec() {
        let m = ModelSpec::build(&vgg11(), 3, 32, 10, &ModelOptions::default()).unwrap();
        assert_eq!(m.conv_params(), 16_227_840);
        assert_eq!(m.head_params(), 41_050);
        assert_eq!(m.conv_params() + m.head_params(), 16_268_890);
        let m = ModelSpec::build(&vgg11(), 3, 32, 100, &ModelOptions::default()).unwrap();
        assert_eq!(m.conv_params() + m.head_params(), 16_638_340);
        assert_eq!(m.layers.last().unwrap().h, 2);
    }

    #[test]
    fn vgg_imagenet_follows_the_released_grid_table() {
        for (size, last_hw) in [(64, 2), (224, 7)] {
            let m = ModelSpec::build(&vgg_imagenet(), 3, size, 1000, &ModelOptions::default()).unwrap();
            assert_eq!(m.layers.iter().map(|l| l.p).collect::<Vec<_>>(), vec![8, 4, 2, 2, 1, 1, 1, 1]);
            assert_eq!(m.goodness_dims(), vec![4096, 2048, 1024, 1024, 512, 512, 512, 512]);
            assert_eq!(m.layers.last().unwrap().out_hw(), (last_hw, last_hw));
        }
    }

    #[test]
    fn width_scales_to_multiples_of_eight() {
        let opt = ModelOptions { width: 0.125, ..Default::default() };
        let m = ModelSpec::build(&vgg8(), 1, 32, 10, &opt).unwrap();
        let ch: Vec<_> = m.layers.iter().map(|l| l.c_out).collect();
        assert_eq!(ch, vec![16, 32, 32, 64, 64, 64, 64]);
        // The grid follows the channel ratio, as in the fixture: P = 4, 2, 2, 1, ...
        assert_eq!(m.layers.iter().map(|l| l.p).collect::<Vec<_>>(), vec![4, 2, 2, 1, 1, 1, 1]);
        assert_eq!(scale_channels(128, 0.3, 0).unwrap(), 40);
        assert_eq!(scale_channels(128, 0.01, 0).unwrap(), 8);
        assert!(scale_channels(128, 0.001, 3).unwrap_err().to_string().contains("layer 4"));
        assert!(scale_channels(128, 0.0, 0).is_err());
    }

    #[test]
    fn grid_formula_clamps_and_follows_alpha() {
        assert_eq!(patch_grid_size(1.0, 512, 64, 32, 32), 8);
        assert_eq!(patch_grid_size(1.0, 512, 512, 2, 2), 1);
        assert_eq!(patch_grid_size(2.0, 512, 128, 32, 32), 8);
        assert_eq!(patch_grid_size(4.0, 512, 128, 4, 4), 4); // clamped to H
        assert_eq!(patch_grid_size(0.25, 512, 512, 8, 8), 1); // rounded up to 1
    }

    #[test]
    fn init_statistics() {
        let m = vgg8_mnist();
        let p = Params::init(&m, 42);
        // Projection std ~ 1/sqrt(N).
        let w = &p.layers[0].proj_w;
        let std = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 1.0 / 10f64.sqrt()).abs() < 0.01, "projection std {std}");
        // Kaiming: 512->512 3x3 has std 0.020833.
        let w = &p.layers[6].conv_w;
        let std = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.020833).abs() < 2e-4, "kaiming std {std}");
        assert!(p.layers.iter().all(|l| l.conv_b.iter().all(|&b| b == 0.0)));
        assert_eq!(p.heads.len(), 6);
        assert_eq!(Params::init(&m, 42), p);
        assert_ne!(Params::init(&m, 43).layers[0].conv_w, p.layers[0].conv_w);
    }

    #[test]
    fn bad_models_are_clear_errors() {
        assert!(arch_by_name("resnet").unwrap_err().to_string().contains("unknown model"));
        assert!(arch_by_name("/nonexistent/x.json").unwrap_err().to_string().contains("/nonexistent/x.json"));
        // Too many pools for the input size.
        let deep = arch("deep", &[8; 7], &[true; 7]);
        let e = ModelSpec::build(&deep, 1, 32, 10, &ModelOptions::default()).unwrap_err();
        assert!(e.to_string().contains("layer"), "{e}");
    }
}
