//! Settings structs that are at once config-file keys (serde) and
//! command-line flags (clap), so that each setting is declared once: its
//! field's doc comment is the flag's help, and its `default_value_t` is the
//! default of the flag, of the config file and of `Default` (shown in
//! `--help` by clap).
//!
//! A flag on the command line overrides the config file's value (or a
//! checkpoint's), which overrides the default. Clap fills every flag not
//! given with its default and records where each value came from
//! ([`ValueSource`]); [`update_given`] sets only the flags given.

use std::any::Any;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};

/// The settings with every flag at its default: the settings' `Default`.
///
/// # Panics
///
/// If a default does not parse as its flag's value, which the tests of
/// each settings struct would show at once.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let matches = T::augment_args(Command::new("defaults").no_binary_name(true))
        .try_get_matches_from(std::iter::empty::<&str>())
        .and_then(|m| T::from_arg_matches(&m));
    match matches {
        Ok(settings) => settings,
        Err(e) => panic!("a setting's default does not parse: {e}"),
    }
}

/// Whether the flag of `id` (a settings field's name) is on the command
/// line, rather than at its default.
pub fn is_given(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

/// The value of the flag `id` when it is on the command line.
pub fn given<T: Any + Clone + Send + Sync + 'static>(matches: &ArgMatches, id: &str) -> Option<T> {
    if is_given(matches, id) {
        matches.get_one::<T>(id).cloned()
    } else {
        None
    }
}

/// Sets the settings in `settings` whose flags are on the command line of
/// `matches` (which parsed `T` among its flags) and leaves the others as
/// they are.
pub fn update_given<T: FromArgMatches>(settings: &mut T, matches: &ArgMatches) -> Result<(), clap::Error> {
    // Clap's update sets every field whose id the matches hold; without the
    // values filled in from defaults they hold just the flags given.
    let mut given = matches.clone();
    for id in matches.ids().filter(|id| !is_given(matches, id.as_str())) {
        // The id is one of these matches', so it is valid.
        let _ = given.try_clear_id(id.as_str());
    }
    settings.update_from_arg_matches(&given)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;

    /// Settings of each kind of flag `train` has.
    #[derive(Debug, Clone, PartialEq, Args)]
    struct Settings {
        #[arg(long, default_value = "a/b")]
        path: PathBuf,
        #[arg(long, default_value_t = 0.5)]
        x: f32,
        #[arg(long, default_value_t = 7)]
        n: u64,
        #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
        on: bool,
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
        opt_in: bool,
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn parse(args: &[&str]) -> ArgMatches {
        Cli::augment_args(Command::new("t")).get_matches_from(std::iter::once("t").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_the_flags_defaults() {
        let d: Settings = defaults();
        assert_eq!(d, Settings { path: "a/b".into(), x: 0.5, n: 7, on: true, opt_in: false });
    }

    /// A file's values stay unless a flag is given, whatever it sets,
    /// including a default's value, NaN, and a flag without its value.
    #[test]
    fn only_the_flags_given_override() {
        let file = Settings { path: "file".into(), x: 2.0, n: 9, on: false, opt_in: false };
        let mut s = file.clone();
        update_given(&mut s, &parse(&[])).unwrap();
        assert_eq!(s, file);
        let m = parse(&["--x", "nan", "--n", "7", "--opt-in"]);
        update_given(&mut s, &m).unwrap();
        assert!(s.x.is_nan());
        assert_eq!((s.n, s.opt_in, s.on, &s.path), (7, true, false, &PathBuf::from("file")));
        assert_eq!(given::<u64>(&m, "n"), Some(7));
        assert_eq!(given::<PathBuf>(&m, "path"), None);
    }
}
