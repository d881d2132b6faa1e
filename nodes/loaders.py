"""Loader nodes: one per component, listing `models/wuerstchen` plus the standard ComfyUI folders."""

from wuerstchen_core import loading
from wuerstchen_core.performance import store_linear_weights_in_fp8

from .spec import DECODER, EFFNET, PRIOR, TEXT_ENCODER, VQGAN, Input, NodeSpec, Output

DTYPES = ("auto", "fp16", "bf16", "fp32")
FP8 = "fp8_e4m3fn"  # Stage B/C only: Linear weights stored in float8, computed in the auto dtype
FP8_FAST = "fp8_e4m3fn_fast"  # ... and multiplied in float8 (ComfyUI's name for it)
TOWERS = {"bigG (Stage C)": "bigG", "H (Stage B)": "H"}

_CORE_LOADERS = {"prior": loading.load_prior, "decoder": loading.load_decoder,
                 "vqgan": loading.load_vqgan, "effnet": loading.load_effnet}


def _names(kind):
    return lambda host: host.list_models(kind)


def _dtype_input(fp8=False):
    return Input("weight_dtype", "COMBO", "Storage dtype of the weights; auto picks what the device supports "
                 "(fp32 on CPU, bf16 or fp16 on GPUs)." + (f" {FP8} stores the Linear weights in float8 (half "
                 f"the memory of fp16) and computes in the auto dtype; {FP8_FAST} also multiplies them in float8 "
                 "(faster on Hopper GPUs, lossy)." if fp8 else ""),
                 default="auto", options=DTYPES + ((FP8, FP8_FAST) if fp8 else ()))


def _loader(kind, what, out_type, folders):
    fp8 = kind in ("prior", "decoder")

    def execute(host, model_name, weight_dtype):
        path = host.resolve_model(kind, model_name, what)
        choice = "auto" if weight_dtype in (FP8, FP8_FAST) else weight_dtype
        module = _CORE_LOADERS[kind](path, dtype=host.weight_dtype(kind, choice))
        if weight_dtype in (FP8, FP8_FAST):
            store_linear_weights_in_fp8(module, matmul=weight_dtype == FP8_FAST)
        return (host.wrap(kind, module, module, model_name),)

    return NodeSpec(
        f"WuerstchenLoad{ {'vqgan': 'VQGAN', 'effnet': 'EffNet'}.get(kind, kind.capitalize())}",
        f"Load Würstchen {what}",
        f"Loads {what} from {folders}: a converted .safetensors file, an original .pt, or a diffusers folder.",
        (Input("model_name", "COMBO", f"A file or diffusers folder in {folders}.", options=_names(kind)),
         _dtype_input(fp8)),
        (Output(kind, out_type, what),),
        execute,
    )


LOAD_PRIOR = _loader("prior", "Stage C prior", PRIOR, "models/wuerstchen or models/diffusion_models")
LOAD_DECODER = _loader("decoder", "Stage B decoder", DECODER, "models/wuerstchen or models/diffusion_models")
LOAD_VQGAN = _loader("vqgan", "Stage A VQGAN", VQGAN, "models/wuerstchen or models/vae")
LOAD_EFFNET = _loader("effnet", "EfficientNet encoder", EFFNET, "models/wuerstchen or models/vae")


def _load_text_encoder(host, model_name, tower, weight_dtype):
    path = host.resolve_model("text_encoder", model_name, "Text encoder")
    enc = loading.load_text_encoder(path, dtype=host.weight_dtype("text_encoder", weight_dtype), tower=TOWERS[tower])
    return (host.wrap("text_encoder", enc, enc.model, model_name, tower=TOWERS[tower]),)


LOAD_TEXT_ENCODER = NodeSpec(
    "WuerstchenLoadTextEncoder",
    "Load Würstchen Text Encoder",
    "Loads a CLIP text tower: ViT-bigG conditions Stage C (SDXL's clip_g file works), ViT-H conditions Stage B.",
    (Input("model_name", "COMBO", "A file or diffusers folder in models/wuerstchen or models/text_encoders.",
           options=_names("text_encoder")),
     Input("tower", "COMBO", "Which Würstchen stage this encoder conditions: bigG for Stage C, H for Stage B.",
           default="bigG (Stage C)", options=tuple(TOWERS)),
     _dtype_input()),
    (Output("text_encoder", TEXT_ENCODER, "CLIP text encoder"),),
    _load_text_encoder,
)

NODES = (LOAD_PRIOR, LOAD_DECODER, LOAD_VQGAN, LOAD_EFFNET, LOAD_TEXT_ENCODER)
