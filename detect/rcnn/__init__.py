"""The R-CNN detector: GoogLeNet as the region classifier (regions, model, postprocess, engine, pipeline)."""
