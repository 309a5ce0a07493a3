"""Vision side: the paper's ViT, the baselines, CLS embeddings and similarity sampling."""
