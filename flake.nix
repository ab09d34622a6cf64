{
  description = "mvm: a security-first local microVM runtime and Nix-centric build toolchain";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      # mvm boots x86_64 guests with a host-side runner: x86_64 Linux hosts only.
      systems = [ "x86_64-linux" ];
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f system nixpkgs.legacyPackages.${system};
          }) systems
        );
      modules = import ./modules;
      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
    in
    {
      packages = forAllSystems (
        system: pkgs:
        let
          workspace = {
            inherit version;
            src = pkgs.lib.cleanSource ./.;
            cargoLock.lockFile = ./Cargo.lock;
            # The test suite boots microVMs and runs the real Nix, QEMU and registries: run it
            # with scripts/test, not inside the build sandbox.
            doCheck = false;
          };
          # The guest agent: the guest's /init, so linked statically (no dynamic loader there).
          mvm-agent = pkgs.pkgsStatic.rustPlatform.buildRustPackage (
            workspace
            // {
              pname = "mvm-agent";
              cargoBuildFlags = [
                "-p"
                "mvm-agent"
              ];
              meta.mainProgram = "mvm-agent";
            }
          );
          # The CLI and the runner, with the agent beside them, where `mvm build` looks for it.
          mvm = pkgs.rustPlatform.buildRustPackage (
            workspace
            // {
              pname = "mvm";
              cargoBuildFlags = [
                "-p"
                "mvm"
                "-p"
                "mvm-runner"
              ];
              postInstall = ''
                ln -s ${mvm-agent}/bin/mvm-agent $out/bin/mvm-agent
              '';
              meta = {
                description = "Security-first local microVM runtime";
                mainProgram = "mvm";
                license = pkgs.lib.licenses.asl20;
                platforms = systems;
              };
            }
          );
        in
        {
          inherit mvm mvm-agent;
          default = mvm;
        }
      );

      apps = forAllSystems (
        system: _pkgs:
        let
          mvm = {
            type = "app";
            program = "${self.packages.${system}.mvm}/bin/mvm";
          };
        in
        {
          inherit mvm;
          default = mvm;
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          # What scripts/test uses, from nixpkgs instead of apt.
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.mvm ];
            packages = with pkgs; [
              cargo
              rustc
              clippy
              rustfmt
              qemu
              erofs-utils
              cryptsetup
              skopeo
              docker-distribution
              cpio
              lz4
              openssl
              nix
            ];
          };
        }
      );

      # `nix flake init -t <mvm>#python` — the same files `mvm init --template python` writes.
      templates =
        let
          templates = {
            python = {
              path = ./templates/python;
              description = "mvm workload: a Python tool with no network but the package index";
            };
            node = {
              path = ./templates/node;
              description = "mvm workload: a Node.js HTTP service on a forwarded port";
            };
            oci = {
              path = ./templates/oci;
              description = "mvm workload: an OCI image pinned by digest";
            };
            nix = {
              path = ./templates/nix;
              description = "mvm workload declared in Nix with mkWorkload (no mvm.toml)";
            };
          };
        in
        templates // { default = templates.python; };

      # mkWorkload: see modules/mk-workload.nix and docs/nix.md. `mvm` defaults to this
      # flake's build when `pkgs` is given.
      lib = {
        mkWorkload =
          spec:
          modules.mkWorkload (
            if spec ? pkgs && !(spec ? mvm) then
              spec // { mvm = self.packages.${spec.pkgs.stdenv.hostPlatform.system}.mvm; }
            else
              spec
          );
      };

      checks = forAllSystems (
        system: pkgs:
        let
          example = self.lib.mkWorkload {
            inherit pkgs;
            name = "flake-check";
            packages = [ "busybox" ];
            entrypoint = [ "busybox" "true" ];
          };
        in
        {
          inherit (self.packages.${system}) mvm;
          # mkWorkload's IR, accepted by mvm's own validator.
          mkWorkload = example.check;
          # Every template's mvm.toml, accepted by mvm's own validator.
          templates = pkgs.runCommand "mvm-templates-check" { nativeBuildInputs = [ self.packages.${system}.mvm ]; } ''
            for t in ${./templates}/*/mvm.toml; do mvm ir validate "$t"; done > $out
          '';
        }
      );
    };
}
