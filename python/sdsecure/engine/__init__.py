"""ONNX -> MAX engine.

    create_session(model, weights, input_shapes, *, backend="max", name="") -> Session
        model: onnx.ModelProto (external data NOT loaded); weights: initializer name -> np.ndarray
        (zero-copy views from VerifiedModel.onnx_weights); input_shapes: input name -> concrete shape.
        backend "max" (our importer, compiled, cached by (graph sha256, shapes, device)) or
        "onnxruntime" (reference). Raises UnsupportedOpError before compiling anything.
    Session.input_names / .output_names / .run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]
"""
