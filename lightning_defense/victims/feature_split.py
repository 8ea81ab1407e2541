"""Where a network's feature extractor S_a ends and its head S_b begins, for any network.

Trigger-inversion defenses (BTI-DBF) work on a victim's features and run the head on altered
features, so every victim must answer ``features(x)`` and ``head(f)`` with
``head(features(x)) == network(x)``, and name its last linear layer (FT/FST re-initialise it).
The split comes from the network's own library where it has one, never from per-architecture
tables of ours:

- this project's networks (:mod:`~lightning_defense.victims.architectures`) define
  ``features``/``head``/``linear_layer`` themselves;
- timm models: ``forward_features`` / ``forward_head`` / ``get_classifier``;
- any other ``nn.Module`` that ``torch.fx`` can trace (torchvision's models, a user's own):
  torchvision's feature extraction cuts the traced graph at a node, by default the input of
  the global pooling or token selection nearest the output (ResNet: ``layer4``, VGG: ``features``,
  ViT: ``encoder.ln``), or at the node named by ``feature_node``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lightning_defense.errors import ConfigurationError

#: operations that reduce a feature map to a vector (global pooling) or pick a token (ViT's x[:, 0])
_REDUCING_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_REDUCING_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, torch.mean, operator.getitem)
_REDUCING_METHODS = ("mean", "amax")


class FeatureSplit:
    """``features``, ``head`` and ``linear`` of one network (see the module's docs)."""

    def features(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def linear(self) -> nn.Linear:
        raise NotImplementedError


class OwnSplit(FeatureSplit):
    """A network that defines the split itself (this project's architectures)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def features(self, inputs: Tensor) -> Tensor:
        return self.network.features(inputs)

    def head(self, features: Tensor) -> Tensor:
        return self.network.head(features)

    @property
    def linear(self) -> nn.Linear:
        return self.network.get_submodule(self.network.linear_layer)


class TimmSplit(FeatureSplit):
    """timm's own split: every timm model has ``forward_features`` and ``forward_head``."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def features(self, inputs: Tensor) -> Tensor:
        return self.network.forward_features(inputs)

    def head(self, features: Tensor) -> Tensor:
        return self.network.forward_head(features)

    @property
    def linear(self) -> nn.Linear:
        return _last_linear(self.network.get_classifier(), type(self.network).__name__)


class GraphSplit(FeatureSplit):
    """The traced graph of ``network`` cut at ``feature_node`` (a node name, as
    :func:`torchvision.models.feature_extraction.get_graph_node_names` lists them, or a module's
    name, e.g. ``layer3``, for its output). The graph is
    the network's eval-mode one (they differ only where ``forward`` branches on ``self.training``)."""

    def __init__(self, network: nn.Module, feature_node: str | None = None) -> None:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        name = type(network).__name__
        try:
            nodes = get_graph_node_names(network)[1]
        except Exception as err:  # tracing a user's network can fail in many ways
            raise ConfigurationError(
                f"Cannot trace {name} with torch.fx ({type(err).__name__}: {str(err)[:300]}), so its feature "
                "extractor and head are unknown. Give the network `features(x)` and `head(f)` methods and a "
                "`linear_layer` name, or use it with defenses that only need its outputs."
            ) from err
        known = feature_node is None or any(n == feature_node or n.startswith(f"{feature_node}.") for n in nodes[:-1])
        if not known:  # a node, or a module: its last node
            raise ConfigurationError(
                f"{name} has no graph node {feature_node!r} to split at; its nodes end with: {', '.join(nodes[-8:])}."
            )
        wanted = {nodes[-1]: "logits"} | ({feature_node: "features"} if feature_node else {})
        whole = create_feature_extractor(network, return_nodes=wanted)
        graph = whole.eval_graph
        outputs = next(n for n in graph.nodes if n.op == "output").args[0]
        logits = outputs["logits"]
        cut = outputs["features"] if feature_node else _node_before_reduction(whole, logits, name)
        self._features = _subgraph(whole, graph, cut)
        self._head = _subgraph(whole, graph, logits, cut=cut)
        self._linear = _linear_nearest_output(whole, graph, name)

    def features(self, inputs: Tensor) -> Tensor:
        return self._features(inputs)

    def head(self, features: Tensor) -> Tensor:
        return self._head(features)

    @property
    def linear(self) -> nn.Linear:
        return self._linear


def feature_split(network: nn.Module, feature_node: str | None = None) -> FeatureSplit:
    """The split of ``network``: its own, timm's, or a traced graph's (``feature_node`` forces the last)."""
    if feature_node is None and all(hasattr(network, a) for a in ("features", "head", "linear_layer")):
        return OwnSplit(network)
    if feature_node is None and hasattr(network, "forward_features") and hasattr(network, "forward_head"):
        return TimmSplit(network)
    return GraphSplit(network, feature_node)


def _reduces(whole: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(whole.get_submodule(node.target), _REDUCING_MODULES)
    if node.op == "call_function":
        return node.target in _REDUCING_FUNCTIONS
    return node.op == "call_method" and node.target in _REDUCING_METHODS


def _first_input(node: fx.Node) -> fx.Node | None:
    return next((a for a in node.args if isinstance(a, fx.Node)), None)


def _node_before_reduction(whole: fx.GraphModule, logits: fx.Node, name: str) -> fx.Node:
    """Walk back from the logits to the nearest global pooling or token selection; its input."""
    node = logits
    while node is not None and node.op != "placeholder":
        if _reduces(whole, node):
            before = _first_input(node)
            if before is not None and before.op != "placeholder":
                return before
            break
        node = _first_input(node)
    raise ConfigurationError(
        f"Found no global pooling or token selection before {name}'s output, so where its features end is "
        "unknown: name the graph node with `feature_node` (torchvision's get_graph_node_names lists them)."
    )


def _subgraph(whole: fx.GraphModule, graph: fx.Graph, output: fx.Node, cut: fx.Node | None = None) -> fx.GraphModule:
    """The nodes of ``graph`` that compute ``output``: from the network's input, or, with ``cut``,
    from that node's value (then the module's one argument). Nothing else is kept (not even
    input-size asserts, which fx would keep as side effects)."""
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is not cut:
            stack.extend(node.all_input_nodes)
    if cut is not None and any(n.op == "placeholder" for n in needed):  # e.g. reads the batch size off the input
        raise ConfigurationError(
            f"The part of the network after {cut.name!r} also reads the network's input; name another "
            "`feature_node` (torchvision's get_graph_node_names lists them)."
        )
    part = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    if cut is not None:
        mapping[cut] = part.placeholder("features")
    for node in graph.nodes:
        if node in needed and node not in mapping:
            mapping[node] = part.node_copy(node, mapping.__getitem__)
    part.output(mapping[output])
    return fx.GraphModule(whole, part)


def _linear_nearest_output(whole: fx.GraphModule, graph: fx.Graph, name: str) -> nn.Linear:
    for node in reversed(list(graph.nodes)):
        if node.op == "call_module" and isinstance(whole.get_submodule(node.target), nn.Linear):
            return whole.get_submodule(node.target)
    raise ConfigurationError(f"{name} has no nn.Linear layer: FT/FST cannot re-initialise its classifier.")


def _last_linear(module: nn.Module, name: str) -> nn.Linear:
    if isinstance(module, nn.Linear):
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigurationError(f"{name}'s classifier has no nn.Linear layer: FT/FST cannot re-initialise it.")
    return linears[-1]
