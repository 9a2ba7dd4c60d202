"""The graph IR every frontend (torch.fx, the hook fallback, ONNX) produces and every static
rule reads."""

from netdoctor.graph.ir import Graph, ModuleInfo, Node, ParamInfo, UnregisteredHolder

__all__ = ["Graph", "ModuleInfo", "Node", "ParamInfo", "UnregisteredHolder"]
