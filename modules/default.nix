# mvm's Nix library: `mkWorkload` (./mk-workload.nix). The flake exports it as
# `lib.mkWorkload`; without flakes: `(import ./modules).mkWorkload { … }`.
{
  mkWorkload = import ./mk-workload.nix;
}
