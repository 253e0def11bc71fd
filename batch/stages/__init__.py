"""The pipeline's stages. Each claims rows in one state from the ledger and moves them on."""
