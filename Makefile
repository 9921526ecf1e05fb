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

all: modules

modules clean:
	cargo fetch --locked --quiet
	$(MAKE) -C $(KDIR) M=$(PWD) RUSTC=$(RUSTC) CLIPPY_DRIVER=$(CLIPPY_DRIVER) BINDGEN=$(BINDGEN) \
		PYTHON3=python3 $(if $(CLIPPY),CLIPPY=$(CLIPPY)) $@

.PHONY: all modules clean
