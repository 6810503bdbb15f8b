// Package types holds the JSON shape of a command tree (a command, its flags
// and its subcommands) that Telepresence 2 embeds to mirror the flags of
// "docker compose". Written for the benchmark build as a stand-in for the
// unpublished github.com/telepresenceio/telepresence/cmd/cobraparser/v2 module.
package types

// CommandInfo is one command of the tree.
type CommandInfo struct {
	Name        string        `json:"name"`
	Usage       string        `json:"usage,omitempty"`
	Description string        `json:"description,omitempty"`
	Flags       []FlagInfo    `json:"flags,omitempty"`
	Subcommands []CommandInfo `json:"subcommands,omitempty"`
}

// FlagInfo is one flag of a command; Type uses pflag's type names, plus the
// docker-specific "bytes", "list", "filter" and "scale".
type FlagInfo struct {
	Name        string `json:"name,omitempty"`
	Shorthand   string `json:"shorthand,omitempty"`
	Type        string `json:"type,omitempty"`
	Description string `json:"description,omitempty"`
	Default     string `json:"default,omitempty"`
	Global      bool   `json:"global,omitempty"`
	Inherited   bool   `json:"inherited,omitempty"`
}
