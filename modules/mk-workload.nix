# mkWorkload: a workload declared in Nix → Workload IR v0 (the same document as workload.json
# or mvm.toml) and, given nixpkgs, the derivations that go with it.
#
# Uses builtins only, so the IR half evaluates with no nixpkgs at all (that is what mvm's own
# tests evaluate, offline, with `nix-instantiate --eval --strict --json`). The attribute names
# are the IR's own; the few shortcuts are listed in docs/nix.md. Unknown attributes are refused,
# as the IR refuses unknown fields. Every rule beyond types (identifiers, ranges, digests) is
# left to `mvm ir validate`, the one place those rules live.
#
#   mkWorkload {
#     name = "hello";                       # the workload id
#     packages = [ "python3" ];             # or: image = { reference; digest; };
#     entrypoint = [ "python3" "-V" ];
#     resources = { cpu_cores = 1; memory_mb = 512; };
#     env.GREETING = "hi";                  # literals
#     secrets.API_KEY = "api-key";          # references: only the secret's name is stored
#     network.egress.allowlist = [ "api.example.com:443" ];
#     profile = "restrictive";              # for `mvm build --profile`; not part of the IR
#     pkgs = nixpkgs.legacyPackages.x86_64-linux;   # optional: adds the derivations
#   }
#
# Returns { id, ir, json, profile, packages, buildArgs } and, with `pkgs`, { workloadJson,
# roots } (and `check` with `mvm`).
spec:

let
  inherit (builtins)
    attrNames
    concatStringsSep
    elem
    filter
    foldl'
    hasAttr
    isAttrs
    isInt
    isList
    isString
    length
    listToAttrs
    map
    match
    typeOf
    ;

  fail = where: msg: throw "mkWorkload: ${where}: ${msg}";

  # Refuses attributes not in `known`, as the IR refuses unknown fields.
  only =
    where: known: attrs:
    if !isAttrs attrs then
      fail where "expected an attribute set, got a ${typeOf attrs}"
    else
      let
        unknown = filter (n: !elem n known) (attrNames attrs);
      in
      if unknown == [ ] then
        attrs
      else
        fail where "unknown attribute(s) ${concatStringsSep ", " unknown} (known: ${concatStringsSep ", " known})";

  str = where: v: if isString v then v else fail where "expected a string, got a ${typeOf v}";
  int = where: v: if isInt v then v else fail where "expected an integer, got a ${typeOf v}";
  list = where: v: if isList v then v else fail where "expected a list, got a ${typeOf v}";
  set = where: v: if isAttrs v then v else fail where "expected an attribute set, got a ${typeOf v}";
  strings = where: v: map (str where) (list where v);

  # `{ a = x; b = null; }` → `{ a = x; }`: absent optional fields stay absent in the IR.
  compact = attrs: removeAttrs attrs (filter (n: attrs.${n} == null) (attrNames attrs));
  opt = attrs: name: if hasAttr name attrs then attrs.${name} else null;
  imap = f: xs: builtins.genList (i: f i (builtins.elemAt xs i)) (length xs);

  image =
    where: app:
    let
      hasPackages = hasAttr "packages" app;
      hasImage = hasAttr "image" app;
    in
    if hasPackages && hasImage then
      fail where "give either packages (Nix) or image (OCI), not both"
    else if hasPackages then
      {
        kind = "nix_packages";
        packages = strings "${where}.packages" app.packages;
      }
    else if hasImage then
      let
        i = only "${where}.image" [ "kind" "reference" "digest" ] app.image;
      in
      if (i.kind or "oci_base") != "oci_base" then
        fail "${where}.image" "kind must be \"oci_base\" (Nix images are given as packages)"
      else
        {
          kind = "oci_base";
          reference = str "${where}.image.reference" (i.reference or (fail "${where}.image" "reference is required"));
          digest = str "${where}.image.digest" (i.digest or (fail "${where}.image" "digest is required"));
        }
    else
      fail where "give packages (Nix attribute paths) or image (an OCI reference and digest)";

  command =
    where: e:
    if isList e then
      {
        kind = "command";
        command = strings where e;
      }
    else if (e.kind or "command") == "service" then
      # A service: started by `mvm up`, kept running by the guest agent (docs/services.md).
      let
        c = only where [ "kind" "name" "command" "cwd" "restart" "max_restarts" ] e;
      in
      compact {
        kind = "service";
        name = str "${where}.name" (c.name or (fail where "a service needs a name"));
        command = strings "${where}.command" (c.command or (fail where "command is required"));
        cwd = if c ? cwd then str "${where}.cwd" c.cwd else null;
        restart = if c ? restart then str "${where}.restart" c.restart else null;
        max_restarts = if c ? max_restarts then int "${where}.max_restarts" c.max_restarts else null;
      }
    else
      let
        c = only where [ "kind" "command" "cwd" ] e;
      in
      compact {
        kind = "command";
        command = strings "${where}.command" (c.command or (fail where "command is required"));
        cwd = if c ? cwd then str "${where}.cwd" c.cwd else null;
      };

  entrypoints =
    where: app:
    if hasAttr "entrypoint" app && hasAttr "entrypoints" app then
      fail where "give either entrypoint or entrypoints, not both"
    else if hasAttr "entrypoint" app then
      [
        (command "${where}.entrypoint" (
          if app ? cwd then
            {
              command = app.entrypoint;
              inherit (app) cwd;
            }
          else
            app.entrypoint
        ))
      ]
    else if hasAttr "cwd" app then
      fail where "cwd goes with entrypoint; with entrypoints, give each its own cwd"
    else
      imap (i: e: command "${where}.entrypoints.${toString i}" e) (
        list "${where}.entrypoints" (app.entrypoints or [ ])
      );

  resources =
    where: r:
    let
      r' = only where [ "cpu_cores" "memory_mb" "rootfs_size_mb" ] r;
    in
    compact {
      cpu_cores = int "${where}.cpu_cores" (r'.cpu_cores or 1);
      memory_mb = int "${where}.memory_mb" (r'.memory_mb or 256);
      rootfs_size_mb = if r' ? rootfs_size_mb then int "${where}.rootfs_size_mb" r'.rootfs_size_mb else null;
    };

  secretRef =
    where: v:
    if isString v then
      {
        kind = "secret_ref";
        name = v;
      }
    else
      let
        s = only where [ "name" "optional" ] v;
      in
      {
        kind = "secret_ref";
        name = str "${where}.name" (s.name or (fail where "name is required"));
      }
      // (if s.optional or false then { optional = true; } else { });

  env =
    where: app:
    let
      literals = set "${where}.env" (app.env or { });
      secrets = set "${where}.secrets" (app.secrets or { });
      both = filter (n: hasAttr n secrets) (attrNames literals);
    in
    if both != [ ] then
      fail where "${concatStringsSep ", " both} given in both env and secrets"
    else
      builtins.mapAttrs (n: v: {
        kind = "literal";
        value = str "${where}.env.${n}" v;
      }) literals
      // builtins.mapAttrs (n: v: secretRef "${where}.secrets.${n}" v) secrets;

  # "host:port" or { host; port; }.
  grant =
    where: g:
    if isString g then
      let
        m = match "(.+):([0-9]{1,5})" g;
      in
      if m == null then
        fail where "${g} is not host:port"
      else
        {
          host = builtins.elemAt m 0;
          port = builtins.fromJSON (builtins.elemAt m 1);
        }
    else
      let
        g' = only where [ "host" "port" ] g;
      in
      {
        host = str "${where}.host" (g'.host or (fail where "host is required"));
        port = int "${where}.port" (g'.port or (fail where "port is required"));
      };

  # 8080 or { guest; host; }.
  port =
    where: p:
    if isInt p then
      { guest = p; }
    else
      let
        p' = only where [ "guest" "host" ] p;
      in
      compact {
        guest = int "${where}.guest" (p'.guest or (fail where "guest is required"));
        host = if p' ? host then int "${where}.host" p'.host else null;
      };

  network =
    where: n:
    let
      n' = only where [ "mode" "egress" "ports" ] n;
      egress = only "${where}.egress" [ "allowlist" ] (n'.egress or { });
      allowlist = imap (i: g: grant "${where}.egress.allowlist.${toString i}" g) (
        list "${where}.egress.allowlist" (egress.allowlist or [ ])
      );
      ports = imap (i: p: port "${where}.ports.${toString i}" p) (list "${where}.ports" (n'.ports or [ ]));
    in
    {
      # Listing a destination is the grant: the mode follows unless stated.
      mode = str "${where}.mode" (n'.mode or (if allowlist == [ ] then "none" else "allowlist"));
    }
    // (if allowlist == [ ] then { } else { egress.allowlist = allowlist; })
    // (if ports == [ ] then { } else { inherit ports; });

  source =
    where: s:
    let
      s' = only where [ "kind" "path" "url" "rev" ] s;
    in
    if s' ? path then
      {
        kind = "path";
        path = str "${where}.path" s'.path;
      }
    else
      {
        kind = "git";
        url = str "${where}.url" (s'.url or (fail where "give path, or url and rev"));
        rev = str "${where}.rev" (s'.rev or (fail where "rev is required"));
      };

  # IR-shaped values passed through as written, after a check of their attribute names.
  passList =
    where: known: xs:
    imap (i: x: only "${where}.${toString i}" known x) (list where xs);

  appAttrs = [
    "name"
    "packages"
    "image"
    "entrypoint"
    "entrypoints"
    "cwd"
    "resources"
    "env"
    "secrets"
    "network"
    "mounts"
    "files"
    "health_check"
    "threat_tier"
    "source"
  ];

  mkApp =
    where: a:
    let
      app = only where appAttrs a;
      eps = entrypoints where app;
      vars = env where app;
    in
    compact {
      name = str "${where}.name" (app.name or "main");
      source = if app ? source then source "${where}.source" app.source else null;
      image = image where app;
      resources = resources "${where}.resources" (app.resources or { });
      entrypoints = if eps == [ ] then fail where "give an entrypoint (an argv list)" else eps;
      env = if vars == { } then null else vars;
      # No network is the IR's default, left out as the IR leaves it out.
      network =
        let
          n = network "${where}.network" (app.network or { });
        in
        if n == { mode = "none"; } then null else n;
      mounts = if app ? mounts then passList "${where}.mounts" [ "volume" "target" "read_only" ] app.mounts else null;
      files = if app ? files then passList "${where}.files" [ "path" "content" "mode" ] app.files else null;
      health_check =
        if app ? health_check then
          only "${where}.health_check" [
            "command"
            "tcp_port"
            "http"
            "interval_s"
            "timeout_s"
            "retries"
            "start_period_s"
          ] app.health_check
        else
          null;
      threat_tier = if app ? threat_tier then str "${where}.threat_tier" app.threat_tier else null;
    };

  workloadAttrs = [
    "name"
    "apps"
    "volumes"
    "profile"
    "pkgs"
    "mvm"
  ];
  singleAppAttrs = filter (n: n != "name") appAttrs;

  # A finished IR document (`ir = builtins.fromTOML (builtins.readFile ./mvm.toml)`) is taken
  # as it is: mvm.toml stays the declaration, and the flake adds the derivations.
  fromIR = hasAttr "ir" spec;
  s =
    if fromIR then
      only "workload" [ "ir" "profile" "pkgs" "mvm" ] spec
    else
      only "workload" (workloadAttrs ++ singleAppAttrs ++ [ "app" ]) spec;
  given = filter (n: hasAttr n s) singleAppAttrs;

  declared =
    let
      id = str "name" (s.name or (fail "workload" "name (the workload id) is required"));
      apps =
        if s ? apps then
          if given != [ ] || s ? app then
            fail "workload" "with apps, give ${concatStringsSep ", " given} inside each app"
          else
            imap (
              i: a:
              if isAttrs a && a ? name then
                mkApp "apps.${toString i}" a
              else
                fail "apps.${toString i}" "name is required"
            ) (list "apps" s.apps)
        else
          [ (mkApp "app" (removeAttrs s (workloadAttrs ++ [ "app" ]) // { name = s.app or "main"; })) ];
    in
    {
      schema_version = "0";
      inherit id apps;
    }
    // (
      if (s.volumes or [ ]) == [ ] then
        { }
      else
        { volumes = passList "volumes" [ "name" "size_mb" ] s.volumes; }
    );

  ir =
    if fromIR then
      only "ir" [ "schema_version" "id" "apps" "volumes" ] (set "ir" s.ir)
    else
      declared;
  id = str "ir.id" ir.id;
  apps = list "ir.apps" ir.apps;

  profile = str "profile" (s.profile or "standard");
  profiles = [
    "restrictive"
    "standard"
    "dev"
    "permissive"
  ];

  json = builtins.toJSON ir;

  nixApps = filter (a: (a.image.kind or null) == "nix_packages") apps;
  packages = listToAttrs (
    map (a: {
      inherit (a) name;
      value = a.image.packages;
    }) nixApps
  );

  # Tested with `?`, never compared: the IR half must not force nixpkgs (evaluating it offline
  # must not fetch it).
  inherit (s) pkgs mvm;

  # "python3Packages.requests" → pkgs.python3Packages.requests.
  resolve =
    attrPath:
    foldl' (
      set: part:
      if isAttrs set && hasAttr part set then
        set.${part}
      else
        fail "packages" "nixpkgs has no ${attrPath} (no attribute ${part})"
    ) pkgs (builtins.filter isString (builtins.split "\\." attrPath));

  derivations =
    if !(s ? pkgs) then
      { }
    else
      {
        # The IR as a file in the store, for `mvm build --ir`.
        workloadJson = pkgs.writeText "${id}-workload.json" json;
        # Each Nix app's packages, joined into one tree: the closure its root filesystem holds.
        roots = builtins.mapAttrs (
          app: attrPaths:
          pkgs.buildEnv {
            name = "mvm-${id}-${app}-root";
            paths = map resolve attrPaths;
          }
        ) packages;
      }
      // (
        if !(s ? mvm) then
          { }
        else
          {
            # `mvm ir validate` of the document: the IR's rules, applied by mvm itself.
            check = pkgs.runCommand "mvm-${id}-ir-check" { nativeBuildInputs = [ mvm ]; } ''
              mvm ir validate ${derivations.workloadJson} > $out
            '';
          }
      );
in
if !elem profile profiles then
  fail "profile" "${profile} is not one of ${concatStringsSep ", " profiles}"
else
  {
    inherit
      id
      ir
      json
      profile
      packages
      ;
    # The flags `mvm build` takes for this workload beside the file.
    buildArgs = [
      "--profile"
      profile
    ];
  }
  // derivations
