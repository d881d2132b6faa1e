"""Convert between ComfyUI's UI (graph, version 0.4) workflow format and the API (prompt) format.

UI nodes keep their widget values in `widgets_values`, in widget order; a seed widget with
control_after_generate is followed by the control value ("fixed", ...), LoadImage's image list by
its "upload" widget. Socket inputs are in `inputs` and refer to `links` entries
[link_id, origin_id, origin_slot, target_id, target_slot, type].
"""

import uuid

from wuerstchen_core import __version__
from wuerstchen_core.errors import WorkflowError

_ABSENT = object()  # an optional widget with no stored value

PACK_ID = "wuerstchen-v2-nodes"  # registry id = pyproject [project].name
CORE_VERSION = "0.3.64"
EXTRA_VALUES = {"control_after_generate": "fixed", "upload": "image"}


def is_ui_workflow(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _links(ui) -> dict:
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):  # workflow version 1
            out[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            out[link[0]] = (link[1], link[2])
    return out


def ui_to_api(ui: dict, specs: dict) -> dict:
    """The API-format prompt of a UI workflow (muted nodes are left out)."""
    links = _links(ui)
    prompt = {}
    for node in ui["nodes"]:
        nid, mode = node.get("id"), node.get("mode", 0)
        if mode == 2:
            continue
        spec = specs.get(node.get("type"))
        if spec is None:
            raise WorkflowError(f"Node {nid}: unknown node type {node.get('type')!r}; expected one of this pack's "
                                "nodes or LoadImage, SaveImage, PreviewImage.")
        if mode == 4:
            raise WorkflowError(f"Node {nid} ({spec.node_id}) is bypassed; expected no bypassed nodes (mute or remove it).")
        slots = {i["name"]: i for i in node.get("inputs") or []}
        values = node.get("widgets_values") or []
        inputs, k = {}, 0
        for inp in spec.inputs:
            link = (slots.get(inp.name) or {}).get("link")
            if link is not None and link not in links:
                raise WorkflowError(f"Node {nid} ({spec.node_id}), input '{inp.name}': link {link} is not in the "
                                    "workflow's links.")
            if inp.is_widget:
                if isinstance(values, dict):
                    value = values.get(inp.name)
                elif k < len(values):
                    value = values[k]
                elif inp.optional:  # a widget added after the workflow was saved: its default applies
                    value = _ABSENT
                else:
                    raise WorkflowError(f"Node {nid} ({spec.node_id}): widgets_values has {len(values)} entries, "
                                        f"expected {_widget_count(spec)} (no value for '{inp.name}').")
                if value is not _ABSENT:
                    k += 1 + inp.ui_extra_values
                    if link is None:
                        inputs[inp.name] = value
            if link is not None:
                origin, slot = links[link]
                inputs[inp.name] = [str(origin), slot]
        if isinstance(values, list) and k != len(values):
            raise WorkflowError(f"Node {nid} ({spec.node_id}): widgets_values has {len(values)} entries, "
                                f"expected {_widget_count(spec)}.")
        prompt[str(nid)] = {"class_type": spec.node_id, "inputs": inputs,
                            "_meta": {"title": node.get("title") or spec.display_name}}
    return prompt


def _widget_count(spec) -> int:
    return sum(1 + i.ui_extra_values for i in spec.widgets)


def _depths(api: dict) -> dict:
    """Longest link path from a source, per node (for a left-to-right layout)."""
    depth = {}

    def visit(nid):
        if nid not in depth:
            depth[nid] = 0
            srcs = [str(v[0]) for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = max((visit(s) + 1 for s in srcs), default=0)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def api_to_ui(api: dict, specs: dict, name: str) -> dict:
    """A UI workflow (version 0.4) for an API prompt with numeric node ids, laid out in columns."""
    depth = _depths(api)
    ids = sorted(api, key=lambda n: (depth[n], int(n)))
    rows: dict[int, int] = {}
    nodes, links = {}, []
    for order, nid in enumerate(ids):
        spec = specs[api[nid]["class_type"]]
        col = depth[nid]
        row = rows[col] = rows.get(col, -1) + 1
        sockets = [i for i in spec.inputs if not i.is_widget]
        values = []
        for inp in spec.widgets:
            values.append(api[nid]["inputs"].get(inp.name, inp.default))
            values += [EXTRA_VALUES[a] for a in ("control_after_generate", "upload") if getattr(inp, a)]
        core = spec.node_id in ("LoadImage", "SaveImage", "PreviewImage")
        nodes[nid] = {
            "id": int(nid), "type": spec.node_id, "pos": [40 + 380 * col, 40 + 300 * row],
            "size": [340, 80 + 26 * (len(sockets) + len(spec.widgets))], "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": i.name, "type": i.type, "link": None} for i in sockets],
            "outputs": [{"name": o.name, "type": o.type, "links": [], "slot_index": s} for s, o in enumerate(spec.outputs)],
            "properties": {"Node name for S&R": spec.node_id, "cnr_id": "comfy-core" if core else PACK_ID,
                           "ver": CORE_VERSION if core else __version__},
            "widgets_values": values,
        }
        title = api[nid].get("_meta", {}).get("title")
        if title and title != spec.display_name:
            nodes[nid]["title"] = title
    for nid in ids:  # links in target order
        spec = specs[api[nid]["class_type"]]
        for slot, entry in enumerate(nodes[nid]["inputs"]):
            value = api[nid]["inputs"].get(entry["name"])
            if not isinstance(value, list):
                continue
            src, src_slot = str(value[0]), value[1]
            link_id = len(links) + 1
            link_type = specs[api[src]["class_type"]].outputs[src_slot].type
            links.append([link_id, int(src), src_slot, int(nid), slot, link_type])
            entry["link"] = link_id
            nodes[src]["outputs"][src_slot]["links"].append(link_id)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/{name}")), "revision": 0,
        "last_node_id": max(int(n) for n in api), "last_link_id": len(links),
        "nodes": [nodes[n] for n in sorted(nodes, key=int)], "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }
