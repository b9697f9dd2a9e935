"""The passes of the onnxprune pipeline: lowering, scoring, planning and reconstruction.

Installed as ``onnxprune.passes``; each module holds one kind of pass.
"""
