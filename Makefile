# SPDX-License-Identifier: GPL-2.0
#
#   make KDIR=<kernel build folder>     build pvops_guest.ko (scripts/kernel prints KDIR)
#   make KDIR=... clean
#
# The kernel and this module must be compiled by the same rustc (Debian's rustc-web, which has
# rust-src): RUSTC defaults to it.

KDIR ?= /lib/modules/$(shell uname -r)/build
RUSTC ?= /usr/bin/rustc
BINDGEN ?= /var/cache/pvops/tools/bin/bindgen
PWD := $(CURDIR)

all: modules

modules clean:
	cargo fetch --locked --quiet
	$(MAKE) -C $(KDIR) M=$(PWD) RUSTC=$(RUSTC) BINDGEN=$(BINDGEN) PYTHON3=python3 $@

.PHONY: all modules clean
