"""Artifacts: kernel (recipe -> cached lab host kernel), image (recipe -> cached guest disk), initramfs."""
