# SPDX-License-Identifier: GPL-2.0
#
#   make KDIR=<kernel build folder>     build pvops_guest.ko (scripts/kernel prints KDIR)
#   make KDIR=... CLIPPY=1              the same, linted: clippy-driver instead of rustc for the
#                                       module's Rust and the pvops crates, with the workspace's
#                                       lints (Cargo.toml) and every warning denied
#   make KDIR=... clean
#
# The kernel and this module must be compiled by the same rustc (Debian's rustc-web, which has
# rust-src): RUSTC defaults to it, CLIPPY_DRIVER to its clippy (Debian's rust-web-clippy).

KDIR ?= /lib/modules/$(shell uname -r)/build
RUSTC ?= /usr/bin/rustc
CLIPPY_DRIVER ?= /usr/bin/clippy-driver
BINDGEN ?= /var/cache/pvops/tools/bin/bindgen
PWD := $(CURDIR)

KBUILD = $(MAKE) -C $(KDIR) M=$(PWD) RUSTC=$(RUSTC) CLIPPY_DRIVER=$(CLIPPY_DRIVER) \
	BINDGEN=$(BINDGEN) PYTHON3=python3 $(if $(CLIPPY),CLIPPY=$(CLIPPY))
# The kernel build the objects here were made against: Kbuild names that kernel's generated
# headers relative to its folder, so its command lines do not change with KDIR and nothing
# would be rebuilt for another kernel build (a module whose struct module size is the other
# kernel's, refused at insmod). A changed KDIR cleans first.
KDIR_STAMP := $(PWD)/.pvops-kdir

all: modules

modules:
	cargo fetch --locked --quiet
	@k=$$(realpath $(KDIR)); \
	if [ -f $(KDIR_STAMP) ] && [ "$$(cat $(KDIR_STAMP))" != "$$k" ]; then \
		echo "KDIR is now $$k (was $$(cat $(KDIR_STAMP))): cleaning the objects first"; \
		$(MAKE) --no-print-directory clean >/dev/null; \
	fi; echo "$$k" > $(KDIR_STAMP)
	$(KBUILD) modules

clean:
	$(KBUILD) clean
	rm -rf $(PWD)/guest-kmod/crates $(KDIR_STAMP)

.PHONY: all modules clean
