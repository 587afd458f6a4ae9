// cniclient: a small CNI runtime for the ambient lab, built only on Debian's libcni
// (golang-github-appc-cni-dev 1.1.2):
//
//	cniclient add|check|del <netconf-dir> <net-name> <netns-path> <containerID> [ifname]
//	cniclient gc            <netconf-dir> <net-name> <valid-attachments-json>
//	cniclient status        <netconf-dir> <net-name>
//
// Environment: CNI_PATH (plugin search path, required), CNI_CACHE_DIR (libcni cache,
// default /var/lib/cni), CNI_ARGS ("K=V;K=V", passed to every plugin), CAP_ARGS (JSON
// object of capability args). For del, a netns-path of "" or "-" means "no netns".
//
// ADD prints the chain's result JSON on stdout. Any failure exits 1 after printing two
// lines on stderr: a human one, then `cni-error: {"code":N,"msg":...,"details":...}`
// where code is the CNI error code the plugin returned (0 when the failure was not a
// CNI error, e.g. a missing plugin binary). Usage errors exit 2.
//
// libcni 1.1.2 predates GC and STATUS (CNI 1.1.0). gc and status do what libcni 1.2's
// GCNetworkList / GetStatusNetworkList do: gc first DELs every cached attachment of the
// network that is not in the valid list, then, when the list's cniVersion is >= 1.1.0,
// sends GC to every plugin with cni.dev/valid-attachments (and the legacy
// cni.dev/attachments); status sends STATUS to every plugin when cniVersion >= 1.1.0.
// Below 1.1.0 the plugins are not called, as in libcni 1.2.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/ioutil"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

const usage = `usage:
  cniclient add|check|del <netconf-dir> <net-name> <netns-path> <containerID> [ifname]
  cniclient gc <netconf-dir> <net-name> <valid-attachments-json>
  cniclient status <netconf-dir> <net-name>`

// attachment is one entry of cni.dev/valid-attachments.
type attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

// cacheEntry is the part of libcni's on-disk cache record that GC needs.
type cacheEntry struct {
	Kind           string                 `json:"kind"`
	ContainerID    string                 `json:"containerId"`
	IfName         string                 `json:"ifName"`
	NetworkName    string                 `json:"networkName"`
	CniArgs        [][2]string            `json:"cniArgs,omitempty"`
	CapabilityArgs map[string]interface{} `json:"capabilityArgs,omitempty"`
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	cmd, dir, netName := os.Args[1], os.Args[2], os.Args[3]
	rest := os.Args[4:]

	list, err := libcni.LoadConfList(dir, netName)
	if err != nil {
		fail(cmd, fmt.Errorf("load network %q from %s: %w", netName, dir, err))
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	ctx := context.Background()

	switch cmd {
	case "add", "check", "del":
		if len(rest) < 2 || len(rest) > 3 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		rt, err := runtimeConf(rest)
		if err != nil {
			fail(cmd, err)
		}
		switch cmd {
		case "add":
			result, err := cni.AddNetworkList(ctx, list, rt)
			if err != nil {
				fail(cmd, err)
			}
			if err := result.Print(); err != nil {
				fail(cmd, fmt.Errorf("print result: %w", err))
			}
		case "check":
			if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
				fail(cmd, err)
			}
		case "del":
			if err := cni.DelNetworkList(ctx, list, rt); err != nil {
				fail(cmd, err)
			}
		}
	case "gc":
		if len(rest) != 1 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		var valid []attachment
		if err := json.Unmarshal([]byte(rest[0]), &valid); err != nil {
			fail(cmd, fmt.Errorf("valid attachments must be a JSON list of {containerID, ifname}: %w", err))
		}
		if err := gc(ctx, cni, list, valid); err != nil {
			fail(cmd, err)
		}
	case "status":
		if len(rest) != 0 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		if err := status(ctx, cni, list); err != nil {
			fail(cmd, err)
		}
	default:
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
}

// runtimeConf builds the per-attachment runtime config from the command line and env.
func runtimeConf(args []string) (*libcni.RuntimeConf, error) {
	netns := args[0]
	if netns == "-" {
		netns = ""
	}
	rt := &libcni.RuntimeConf{ContainerID: args[1], NetNS: netns, IfName: "eth0"}
	if len(args) == 3 {
		rt.IfName = args[2]
	}
	pairs, err := parseCNIArgs(os.Getenv("CNI_ARGS"))
	if err != nil {
		return nil, err
	}
	rt.Args = pairs
	if capArgs := os.Getenv("CAP_ARGS"); capArgs != "" {
		if err := json.Unmarshal([]byte(capArgs), &rt.CapabilityArgs); err != nil {
			return nil, fmt.Errorf("CAP_ARGS is not a JSON object: %w", err)
		}
	}
	return rt, nil
}

// parseCNIArgs splits "K=V;K=V" into pairs, rejecting entries without '='.
func parseCNIArgs(s string) ([][2]string, error) {
	var out [][2]string
	for _, entry := range strings.Split(s, ";") {
		if entry == "" {
			continue
		}
		kv := strings.SplitN(entry, "=", 2)
		if len(kv) != 2 || kv[0] == "" {
			return nil, fmt.Errorf("CNI_ARGS entry %q is not KEY=VALUE", entry)
		}
		out = append(out, [2]string{kv[0], kv[1]})
	}
	return out, nil
}

func supportsV110(list *libcni.NetworkConfigList) bool {
	ok, err := version.GreaterThanOrEqualTo(list.CNIVersion, "1.1.0")
	return err == nil && ok
}

// gc removes stale cached attachments of the network, then asks each plugin to GC.
func gc(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList, valid []attachment) error {
	keep := make(map[attachment]bool, len(valid))
	for _, a := range valid {
		keep[a] = true
	}
	cached, err := cachedAttachments(list.Name)
	if err != nil {
		return err
	}
	var errs []error
	var deleted []attachment
	for _, c := range cached {
		a := attachment{ContainerID: c.ContainerID, IfName: c.IfName}
		if keep[a] {
			continue
		}
		rt := &libcni.RuntimeConf{ContainerID: c.ContainerID, IfName: c.IfName, Args: c.CniArgs, CapabilityArgs: c.CapabilityArgs}
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			errs = append(errs, fmt.Errorf("delete stale attachment %s/%s: %w", c.ContainerID, c.IfName, err))
			continue
		}
		deleted = append(deleted, a)
	}

	called := []string{}
	if supportsV110(list) {
		if valid == nil {
			valid = []attachment{}
		}
		inject := map[string]interface{}{
			"name":                      list.Name,
			"cniVersion":                list.CNIVersion,
			"cni.dev/valid-attachments": valid,
			"cni.dev/attachments":       valid,
		}
		for _, plugin := range list.Plugins {
			if err := execPlugin(ctx, cni, "GC", plugin, inject); err != nil {
				errs = append(errs, fmt.Errorf("plugin %s failed (gc): %w", plugin.Network.Type, err))
				continue
			}
			called = append(called, plugin.Network.Type)
		}
	} else {
		fmt.Fprintf(os.Stderr, "cniclient: cniVersion %s < 1.1.0: GC not sent to plugins\n", list.CNIVersion)
	}
	switch len(errs) {
	case 0:
	case 1:
		return errs[0] // keeps the plugin's typed error (and its code) reachable
	default:
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = e.Error()
		}
		return errors.New(strings.Join(msgs, "; "))
	}
	if deleted == nil {
		deleted = []attachment{}
	}
	out, _ := json.Marshal(map[string]interface{}{"deletedStale": deleted, "pluginsCalled": called})
	fmt.Println(string(out))
	return nil
}

// status asks every plugin for its STATUS, stopping at the first failure (libcni 1.2).
func status(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
	if !supportsV110(list) {
		fmt.Fprintf(os.Stderr, "cniclient: cniVersion %s < 1.1.0: STATUS not sent to plugins\n", list.CNIVersion)
		return nil
	}
	inject := map[string]interface{}{"name": list.Name, "cniVersion": list.CNIVersion}
	for _, plugin := range list.Plugins {
		if err := execPlugin(ctx, cni, "STATUS", plugin, inject); err != nil {
			return fmt.Errorf("plugin %s failed (status): %w", plugin.Network.Type, err)
		}
	}
	return nil
}

// execPlugin runs one plugin for a command that has no container (GC, STATUS).
func execPlugin(ctx context.Context, cni *libcni.CNIConfig, command string, plugin *libcni.NetworkConfig, inject map[string]interface{}) error {
	conf, err := libcni.InjectConf(plugin, inject)
	if err != nil {
		return fmt.Errorf("build %s config for %s: %w", command, plugin.Network.Type, err)
	}
	path, err := invoke.FindInPath(plugin.Network.Type, cni.Path)
	if err != nil {
		return err
	}
	args := &invoke.Args{Command: command, Path: strings.Join(cni.Path, string(os.PathListSeparator))}
	return invoke.ExecPluginWithoutResult(ctx, path, conf.Bytes, args, nil)
}

// cachedAttachments reads libcni's result cache for one network.
func cachedAttachments(netName string) ([]cacheEntry, error) {
	dir := os.Getenv("CNI_CACHE_DIR")
	if dir == "" {
		dir = libcni.CacheDir
	}
	files, err := filepath.Glob(filepath.Join(dir, "results", netName+"-*"))
	if err != nil {
		return nil, err
	}
	var out []cacheEntry
	for _, f := range files {
		data, err := ioutil.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("read cache %s: %w", f, err)
		}
		var e cacheEntry
		if err := json.Unmarshal(data, &e); err != nil || e.NetworkName != netName {
			continue
		}
		out = append(out, e)
	}
	return out, nil
}

// fail prints the error, and its CNI code when a plugin returned one, then exits 1.
func fail(cmd string, err error) {
	fmt.Fprintf(os.Stderr, "cniclient %s: %v\n", cmd, err)
	cniErr := &types.Error{Msg: err.Error()}
	var typed *types.Error
	if errors.As(err, &typed) {
		cniErr = typed
	}
	line, _ := json.Marshal(map[string]interface{}{"code": cniErr.Code, "msg": cniErr.Msg, "details": cniErr.Details})
	fmt.Fprintf(os.Stderr, "cni-error: %s\n", line)
	os.Exit(1)
}
