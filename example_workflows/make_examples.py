"""Writes the example workflows: API format to api/<name>.json, UI format (for ComfyUI's template
browser) to <name>.json. Run from anywhere: python example_workflows/make_examples.py

Model names are those `python -m wuerstchen_core convert` writes (put them in models/wuerstchen);
the last example reads SDXL's clip_g.safetensors from models/text_encoders instead.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))

from nodes.runner import SPECS  # noqa: E402
from nodes.workflow_format import api_to_ui  # noqa: E402

PRIOR, DECODER = "wuerstchen_v2_prior_fp16.safetensors", "wuerstchen_v2_decoder_fp16.safetensors"
VQGAN, EFFNET = "wuerstchen_v2_vqgan_fp16.safetensors", "wuerstchen_v2_effnet_fp16.safetensors"
TEXT_BIGG, TEXT_H = "wuerstchen_v2_text_bigG_fp16.safetensors", "wuerstchen_v2_text_H_fp16.safetensors"
PROMPT = "Anthropomorphic cat dressed as a firefighter, detailed oil painting"


class Graph:
    def __init__(self):
        self.nodes = {}

    def add(self, class_type, title=None, **inputs):
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs,
                           "_meta": {"title": title or SPECS[class_type].display_name}}
        return lambda slot=0: [nid, slot]


def _models(g, bigG=TEXT_BIGG, effnet=False):
    m = dict(
        prior=g.add("WuerstchenLoadPrior", model_name=PRIOR, weight_dtype="auto"),
        decoder=g.add("WuerstchenLoadDecoder", model_name=DECODER, weight_dtype="auto"),
        vqgan=g.add("WuerstchenLoadVQGAN", model_name=VQGAN, weight_dtype="auto"),
        text_c=g.add("WuerstchenLoadTextEncoder", "Text encoder bigG (Stage C)", model_name=bigG,
                     tower="bigG (Stage C)", weight_dtype="auto"),
        text_b=g.add("WuerstchenLoadTextEncoder", "Text encoder H (Stage B)", model_name=TEXT_H,
                     tower="H (Stage B)", weight_dtype="auto"),
    )
    if effnet:
        m["effnet"] = g.add("WuerstchenLoadEffNet", model_name=EFFNET, weight_dtype="auto")
    return m


def _prompts(g, m, prompt=PROMPT, negative=""):
    return dict(
        pos_c=g.add("WuerstchenTextEncode", "Positive (Stage C)", text_encoder=m["text_c"](), text=prompt),
        neg_c=g.add("WuerstchenTextEncode", "Negative (Stage C)", text_encoder=m["text_c"](), text=negative),
        pos_b=g.add("WuerstchenTextEncode", "Positive (Stage B)", text_encoder=m["text_b"](), text=prompt),
        neg_b=g.add("WuerstchenTextEncode", "Negative (Stage B)", text_encoder=m["text_b"](), text=negative),
    )


def _stage_c(g, m, p, latent, seed=42, denoise=1.0, **extra):
    return g.add("WuerstchenStageCSampler", prior=m["prior"](), positive=p["pos_c"](), negative=p["neg_c"](),
                 latent=latent, seed=seed, steps=0, cfg=4.0, sampler="ddpm", denoise=denoise, fast_mode=False,
                 cuda_graphs=False, **extra)


def _stage_b_and_save(g, m, p, stage_c, prefix, seed=42, **extra):
    b = g.add("WuerstchenStageBSampler", decoder=m["decoder"](), positive=p["pos_b"](), negative=p["neg_b"](),
              stage_c=stage_c, seed=seed, steps=12, cfg=0.0, sampler="ddpm", denoise=1.0, fast_mode=False,
              cuda_graphs=False, vqgan_for_preview=m["vqgan"](), **extra)
    image = g.add("WuerstchenStageADecode", vqgan=m["vqgan"](), samples=b(), tile_size=1024, fast_mode=False)
    g.add("SaveImage", images=image(), filename_prefix=prefix)


def text_to_image(batch_size=1, bigG=TEXT_BIGG, prefix="wuerstchen"):
    g = Graph()
    m = _models(g, bigG)
    p = _prompts(g, m)
    latent = g.add("WuerstchenEmptyLatent", width=1024, height=1024, batch_size=batch_size)
    _stage_b_and_save(g, m, p, _stage_c(g, m, p, latent())(), prefix)
    return g.nodes


def image_variation():
    g = Graph()
    m = _models(g, effnet=True)
    p = _prompts(g, m, prompt="")
    image = g.add("LoadImage", image="example.png")
    stage_c = g.add("WuerstchenEffNetEncode", effnet=m["effnet"](), image=image())
    _stage_b_and_save(g, m, p, stage_c(), "wuerstchen_variation")
    return _without_unused(g.nodes)


def stage_c_img2img():
    g = Graph()
    m = _models(g, effnet=True)
    p = _prompts(g, m, prompt="the same scene as a watercolour painting")
    image = g.add("LoadImage", image="example.png")
    latent = g.add("WuerstchenEffNetEncode", effnet=m["effnet"](), image=image())
    _stage_b_and_save(g, m, p, _stage_c(g, m, p, latent(), denoise=0.6)(), "wuerstchen_img2img")
    return g.nodes


def stage_b_inpainting():
    """Transparent pixels of the loaded image (LoadImage's MASK) are regenerated: first the Stage C
    composition, then the Stage B detail; the rest of the image is kept."""
    g = Graph()
    m = _models(g, effnet=True)
    p = _prompts(g, m, prompt="a bouquet of sunflowers in a vase")
    image = g.add("LoadImage", image="example.png")
    latent_c = g.add("WuerstchenEffNetEncode", effnet=m["effnet"](), image=image())
    latent_b = g.add("WuerstchenStageAEncode", vqgan=m["vqgan"](), image=image())
    stage_c = _stage_c(g, m, p, latent_c(), mask=image(1))
    _stage_b_and_save(g, m, p, stage_c(), "wuerstchen_inpaint", latent=latent_b(), mask=image(1))
    return g.nodes


def _without_unused(nodes):
    """Drop nodes nothing links to, except output nodes (the variation has no Stage C prompts)."""
    while True:
        used = {str(v[0]) for n in nodes.values() for v in n["inputs"].values() if isinstance(v, list)}
        unused = [nid for nid, n in nodes.items() if nid not in used and not SPECS[n["class_type"]].output_node]
        if not unused:
            break
        nodes = {nid: n for nid, n in nodes.items() if nid not in unused}
    rename = {old: str(i + 1) for i, old in enumerate(nodes)}
    return {rename[nid]: {**n, "inputs": {k: [rename[str(v[0])], v[1]] if isinstance(v, list) else v
                                          for k, v in n["inputs"].items()}} for nid, n in nodes.items()}


EXAMPLES = {
    "wuerstchen_text_to_image": text_to_image(),
    "wuerstchen_batch_of_4_per_image_seeds": text_to_image(batch_size=4, prefix="wuerstchen_batch"),
    "wuerstchen_image_variation": image_variation(),
    "wuerstchen_stage_c_img2img": stage_c_img2img(),
    "wuerstchen_stage_b_inpainting": stage_b_inpainting(),
    "wuerstchen_sdxl_clip_g_text_encoder": text_to_image(bigG="clip_g.safetensors", prefix="wuerstchen_clip_g"),
}


def main():
    os.makedirs(os.path.join(HERE, "api"), exist_ok=True)
    for name, api in EXAMPLES.items():
        for path, data in ((os.path.join(HERE, "api", name + ".json"), api),
                           (os.path.join(HERE, name + ".json"), api_to_ui(api, SPECS, name))):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, ensure_ascii=False)
                f.write("\n")


if __name__ == "__main__":
    main()
