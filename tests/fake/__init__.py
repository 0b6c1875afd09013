"""A fake kernel and system on a temporary tree: it plays the kernel's part so tests exercise behaviour."""
