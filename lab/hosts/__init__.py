"""Where guests run: the host interface and its providers (nested, local, ssh), probes, domain XML, SSH."""
