"""One file per public op: argument checks, the one autograd Function, the public function, its
torch.library ops and its modules, read top-down (the older ops move here next). The shared route
pieces live below, in fastlayers/_dispatch.py and fastlayers/_autocast.py."""
