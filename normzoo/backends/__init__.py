"""Optional backends for normzoo's ops; none is imported or used unless enabled."""
